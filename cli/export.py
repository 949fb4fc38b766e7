"""`sdq export`: finished images with prompts and provenance, as dataset shards."""
from __future__ import annotations

import re

import click

from sdq.cli.common import (
    configured_storage,
    database_session,
    item_record,
    load_settings,
    output_options,
    report,
)
from sdq.cli.errors import BAD_INPUT, CommandFailed
from sdq.cli.progress import ProgressLine
from sdq.db.queries import get_job
from sdq.images.storage import StorageError, open_storage
from sdq.jobs.export import FORMATS, check_format, export_items, select_item_ids
from sdq.jobs.schedule import describe_schedule, find_schedule

_PREFIX = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")
"""Shard names are `PREFIX-000000.tar`: a visible file name in any folder or bucket."""


@click.command()
@click.argument("job_id", metavar="[JOB]", type=int, required=False)
@click.option("--query", metavar="TEXT", help="Items whose prompt matches TEXT (as `sdq search`).")
@click.option("--schedule", "schedule_name", metavar="NAME",
              help="Every run of the schedule NAME, as one dataset (each image once).")
@click.option("--format", "fmt", type=click.Choice(FORMATS), required=True,
              help="webdataset (tar shards), parquet or "
                   "imagefolder (images/ + metadata.parquet).")
@click.option("-o", "--output", "dest", metavar="DEST", required=True,
              help="A folder, or s3://bucket/prefix.")
@click.option("--shard-size", type=click.IntRange(1), default=1000, show_default=True,
              help="Items per shard.")
@click.option("--prefix", default="shard", show_default=True,
              help="Shard file names: PREFIX-000000.tar ...")
@click.option("--exclude-flagged", is_flag=True,
              help="Leave out images the safety checker flagged (images never checked stay).")
@click.option("--card", is_flag=True,
              help="Also write a dataset card (README.md: settings and counts, as Hugging Face "
                   "hub datasets have); the shards then go under data/.")
@output_options("json", dest="printed")
def export(job_id: int | None, query: str | None, schedule_name: str | None, fmt: str,
           dest: str, shard_size: int, prefix: str, exclude_flagged: bool, card: bool,
           printed: str | None) -> None:
    """Export the finished images of JOB, or those matching --query (or both: the job's
    matching ones), with their prompts and provenance, as dataset shards.

    Shards hold items in id order. Run the same command again to resume an interrupted
    export: shards already written are kept, the rest are written. The folder loads with one
    call (pq: pyarrow.parquet, pd: pandas, load_dataset: Hugging Face datasets):

    \b
      parquet            pq.read_table("DEST")  pd.read_parquet("DEST")
                         load_dataset("parquet", data_dir="DEST")
      parquet --card     load_dataset("DEST")  pq.read_table("DEST/data")
                         pd.read_parquet("DEST/data")
      webdataset         load_dataset("DEST")
      webdataset --card  load_dataset("DEST")
      imagefolder        load_dataset("imagefolder", data_dir="DEST")
                         load_dataset("DEST")
                         pq.read_table("DEST/metadata.parquet")
                         pd.read_parquet("DEST/metadata.parquet")
      imagefolder --card load_dataset("DEST")
                         pq.read_table("DEST/data/metadata.parquet")
                         pd.read_parquet("DEST/data/metadata.parquet")

    Each field has one type whatever the values, so exports of different days concatenate:
    `tags` loads as a list of strings and `error` as a string even where every image has
    none. A webdataset declares the types in a hidden .huggingface.yaml, which
    load_dataset("DEST") reads (load_dataset("webdataset", data_dir="DEST") guesses them from
    the first five samples instead); parquet files carry their own. pyarrow and pandas read
    an imagefolder's records (metadata.parquet), not its images.

    \b
    Examples:
      sdq export 42 --format webdataset -o s3://datasets/castles
      sdq export --query "red dragon" --format imagefolder -o dragons/
      sdq export 42 --format parquet --shard-size 5000 -o castles-parquet/
      sdq export 42 --format parquet --card -o castles-hub/
      sdq export 42 --format parquet --exclude-flagged -o castles-clean/
      sdq export --schedule nightly --format parquet --card -o nightly-hub/
    """
    if schedule_name is not None and (job_id is not None or query is not None):
        raise click.UsageError("--schedule exports every run of a schedule: no JOB or --query")
    if job_id is None and query is None and schedule_name is None:
        raise click.UsageError("give a JOB, --query TEXT or --schedule NAME")
    if not _PREFIX.fullmatch(prefix):
        raise click.BadParameter(f"{prefix!r}: the start of a file name, such as 'shard': "
                                 "letters, digits, '.', '_' and '-', not starting with '.'",
                                 param_hint="--prefix")
    check_format(fmt)
    settings = load_settings(need_broker=False)
    try:
        target = open_storage(dest, max_attempts=settings.max_attempts)
    except StorageError as exc:
        raise CommandFailed.of(exc, "-o/--output", code=BAD_INPUT) from None
    source = configured_storage(settings)
    with database_session(settings, reads_only=True) as session:
        if job_id is not None:
            get_job(session, job_id)
        origin: list[str] = []
        if schedule_name is not None:
            found = find_schedule(session, schedule_name)
            ids = select_item_ids(session, schedule_id=found.id, exclude_flagged=exclude_flagged)
            origin = describe_schedule(session, found)
        else:
            ids = select_item_ids(session, job_id=job_id, text=query,
                                  exclude_flagged=exclude_flagged)
        if not ids:
            raise click.ClickException("no finished images to export")
        bar = ProgressLine("exporting", len(ids))
        try:
            done = export_items(session, source, target, ids, fmt=fmt, describe=item_record,
                                shard_size=shard_size, prefix=prefix, card=card,
                                origin=origin, on_item=bar.advance)
        finally:
            bar.close()
    report({"destination": dest, "format": fmt, "items": done.items, "shards": done.shards,
            "written": done.written, "skipped": done.skipped},
           f"{done.items} image(s) in {done.shards} shard(s) to {dest}: {done.written} "
           f"written, {done.skipped} already there", printed)
