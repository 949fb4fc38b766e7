"""`sdq search`, `sdq show` and `sdq get`: find past images, read their provenance, fetch them."""
from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import click

from sdq.cli.common import (
    ITEM_FIELDS,
    configured_storage,
    database_session,
    emit,
    item_record,
    limit_option,
    load_settings,
    output_options,
    plain,
    write_file,
)
from sdq.cli.errors import CommandFailed, Reported
from sdq.core.errors import CheckFailed
from sdq.core.jobspec import safety_label
from sdq.core.states import Status
from sdq.db.queries import get_item, get_items, job_items, search_items
from sdq.core.params import SEED_LIMIT, ParamError
from sdq.core.params import text as text_check
from sdq.images.storage import StorageError

_COLUMNS = ["id", "job", "seed", "sampler", "size", "safety", "prompt", "created"]
_EXCERPT = 60
_TIME = click.DateTime(["%Y-%m-%d", "%Y-%m-%d %H:%M", "%Y-%m-%dT%H:%M", "%Y-%m-%d %H:%M:%S",
                        "%Y-%m-%dT%H:%M:%S"])


def _utc(ctx: click.Context, param: click.Parameter, value: datetime | None) -> datetime | None:
    """Times on the command line are UTC, as every time sdq records is."""
    return value.replace(tzinfo=timezone.utc) if value is not None else None


def _table_row(record: dict[str, Any]) -> dict[str, Any]:
    prompt = record["prompt"].replace("\n", " ")
    excerpt = prompt if len(prompt) <= _EXCERPT else prompt[:_EXCERPT - 3] + "..."
    return {**record, "size": f"{record['width']}x{record['height']}", "prompt": excerpt,
            "safety": safety_label(record)}


def _query(words: tuple[str, ...]) -> str | None:
    """The search text of the words given: bare words are all required, as in quotes, and a
    word like `-cat` is text; `--word` is refused as a mistyped option unless quoted
    (`'"--word"'`), so that a typo never silently becomes a search."""
    for word in words:
        if word.startswith("--") and len(word) > 2:
            raise click.UsageError(f"no such option {word.split('=')[0]}; to search for it, "
                                   f"quote it: sdq search '\"{word}\"'")
    try:
        return text_check("TEXT")(" ".join(words)) if words else None
    except ParamError as exc:
        raise click.BadParameter(exc.reason, param_hint="TEXT") from None


@click.command(context_settings={"ignore_unknown_options": True})
@click.argument("words", metavar="[TEXT]...", nargs=-1)
@click.option("--seed", type=click.IntRange(0, SEED_LIMIT - 1), help="Only this seed.")
@click.option("--model", metavar="NAME|HASH", help="Only this model (name or hash prefix).")
@click.option("--job", "job_id", type=int, help="Only this job.")
@click.option("--status", type=click.Choice([s.value for s in Status]), help="Only this status.")
@click.option("--since", type=_TIME, callback=_utc,
              help="Created at or after this time (UTC), e.g. 2025-06-01 or '2025-06-01 14:00'.")
@click.option("--until", type=_TIME, callback=_utc, help="Created before this time (UTC).")
@click.option("--tag", help="Items with this tag, or whose job has it.")
@click.option("--flagged/--not-flagged", default=None,
              help="Only images the safety checker flagged, or checked and passed (images never "
                   "checked match neither).")
@click.option("--value", "values", multiple=True, metavar="LABEL=VALUE",
              help="Items whose template chose VALUE for LABEL (v1, a wildcard's name, a grid "
                   "field: animal=owl, cfg=7.5); repeatable.")
@click.option("--lora", metavar="NAME", help="Items made with this LoRA (any weight).")
@click.option("--init", metavar="item:ID|SHA", help="Image-to-image items started from item ID's "
              "image, or from the init image of this sha256 (a prefix will do).")
@click.option("--before", metavar="ID", type=click.IntRange(1),
              help="Only ids below ID: the next page starts below the last id shown.")
@limit_option(50)
@output_options("json", "csv")
def search(words: tuple[str, ...], seed: int | None, model: str | None, job_id: int | None,
           status: str | None, since: datetime | None, until: datetime | None, tag: str | None,
           flagged: bool | None, values: tuple[str, ...], lora: str | None, init: str | None,
           before: int | None, limit: int | None, output: str | None) -> None:
    """Find items by prompt TEXT and filters, newest first.

    TEXT matches words anywhere in the prompt, every one of them (`sdq search red fox`);
    "quoted phrases" match in order. Punctuation separates words, on SQLite and PostgreSQL
    alike (`<lora:add_detail:0.8>` is the phrase lora add detail 0 8). The table shortens
    prompts; --json and --csv give every recorded field.

    \b
    Examples:
      sdq search "red dragon" --since 2025-06-01
      sdq search --seed 1234 --model sd15 --json
      sdq search lighthouse --job 42 --status done --csv > lighthouses.csv
      sdq search --job 42 --flagged --json
      sdq search lighthouse --before 5121    # the next page, when the last id shown was 5121
      sdq search --value animal=owl --value cfg=7.5
      sdq search fox --lora add_detail
      sdq search --init item:1234          # variations made from item 1234's image
    """
    text = _query(words)
    chosen = dict(value.split("=", 1) for value in values if "=" in value)
    if len(chosen) != len(values):
        raise click.BadParameter("expected LABEL=VALUE", param_hint="'--value'")
    with database_session() as session:
        page = search_items(session, text=text, seed=seed, model=model, job_id=job_id,
                            status=Status(status) if status else None, since=since, until=until,
                            tag=tag, flagged=flagged, values=chosen, lora=lora, init=init,
                            before=before, limit=limit)
        records = [item_record(item) for item in page.items]
    emit(records if output else [_table_row(r) for r in records], _COLUMNS, output,
         fields=ITEM_FIELDS, empty="no items match")


@click.command()
@click.argument("item_id", metavar="ITEM", type=int)
@output_options("json")
def show(item_id: int, output: str | None) -> None:
    """Show everything recorded about one item: prompt, parameters, model, queue history and,
    once it is done, the software and device that made the image (read from the image).

    \b
    Examples:
      sdq show 1234
      sdq show 1234 --json
    """
    from sdq.images.provenance import MetadataError, read_png_metadata

    settings = load_settings(need_broker=False)
    with database_session(settings) as session:
        record: dict[str, Any] = item_record(get_item(session, item_id))
    if record["image_key"]:
        try:
            data = configured_storage(settings).get(record["image_key"])
            provenance = read_png_metadata(data).provenance
            record["environment"] = vars(provenance.environment) if provenance else None
        except (StorageError, MetadataError) as exc:
            record["environment"] = f"unavailable: {exc}"
    if output == "json":
        click.echo(json.dumps({k: plain(v) for k, v in record.items()}, indent=2,
                              ensure_ascii=False))
        return
    record = _with_init_line(record)
    width = max(map(len, record))
    for key, value in record.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items() if v is not None)
        elif isinstance(value, list):
            value = ", ".join(map(_entry, value))
        click.echo(f"{key:<{width}}  {'' if value is None else plain(value)}")


def _with_init_line(record: dict[str, Any]) -> dict[str, Any]:
    """The record as `show` prints it: the init image (source, short sha256, strength) on one
    `init` line, in place of its three fields; empty for text-to-image."""
    sha256, source, strength = (record.pop(k) for k in ("init_sha256", "init_source", "strength"))
    init = None if sha256 is None else \
        f"{source} (sha256 {sha256[:12]}), strength {strength:g}"
    return {**record, "init": init}


def _entry(value: Any) -> str:
    """One entry of a list field as `show` prints it: a LoRA as `name:weight (sha256 ...)`, an
    embedding as `name (sha256 ...)`, anything else as itself."""
    if not isinstance(value, dict):
        return str(value)
    weight = f":{value['weight']:g}" if "weight" in value else ""
    return f"{value['name']}{weight} (sha256 {str(value['sha256'])[:12]})"


def _same_file(path: Path, sha256: str | None) -> bool:
    return sha256 is not None and path.is_file() and \
        hashlib.sha256(path.read_bytes()).hexdigest() == sha256


@click.command()
@click.argument("item_ids", metavar="[ITEM]...", nargs=-1, type=int)
@click.option("--job", "job_id", type=int, help="Every finished image of this job.")
@click.option("-o", "--output-dir", "directory", required=True,
              type=click.Path(file_okay=False, path_type=Path), help="Folder to write into.")
@output_options("json")
def get(item_ids: tuple[int, ...], job_id: int | None, directory: Path, output: str | None) -> None:
    """Download images as ITEM.png, each with its record as ITEM.json, into a folder.

    The PNGs carry their provenance in their own metadata too. Files already there with the
    recorded sha256 are skipped, so an interrupted download resumes where it stopped. Items
    without an image yet are listed; the exit status is then 1. Images the safety checker
    dropped are listed too, but are not an error.

    \b
    Examples:
      sdq get 1234 1235 -o picks/
      sdq get --job 42 -o job42/
    """
    if bool(item_ids) == (job_id is not None):
        raise click.UsageError("give ITEM ids or --job JOB, not both or neither")
    settings = load_settings(need_broker=False)
    storage = configured_storage(settings)
    written: list[str] = []
    skipped: list[str] = []
    missing: list[dict[str, Any]] = []
    dropped: list[int] = []
    # The rows are read, and the session closed, before any download: no transaction (nor
    # SQLite's write lock) stays open over storage calls.
    wanted: list[tuple[int, str, str | None, bytes]] = []
    with database_session(settings, reads_only=True) as session:
        items = get_items(session, item_ids) if job_id is None else job_items(session, job_id)
        for item in items:
            if item.safety_action == "dropped":
                dropped.append(item.id)
            elif item.image_key is None:
                missing.append({"id": item.id, "status": item.status.value})
            else:
                wanted.append((item.id, item.image_key, item.image_sha256, json.dumps(
                    {k: plain(v) for k, v in item_record(item).items()}, indent=2,
                    ensure_ascii=False).encode()))
    for item_id, key, sha256, sidecar in wanted:
        path = directory / f"{item_id}.png"
        try:
            if _same_file(path, sha256):
                skipped.append(str(path))
            else:
                write_file(path, storage.get(key))
                written.append(str(path))
            if not _same_file(path.with_suffix(".json"), hashlib.sha256(sidecar).hexdigest()):
                write_file(path.with_suffix(".json"), sidecar)
        except StorageError as exc:
            raise CommandFailed.of(exc, f"item {item_id}") from None
    if output == "json":
        click.echo(json.dumps({"written": written, "skipped": skipped, "not_ready": missing,
                               "dropped": dropped}, indent=2))
    else:
        click.echo(f"{len(written)} image(s) written, {len(skipped)} already there, to {directory}")
        for entry in missing:
            click.echo(f"item {entry['id']}: no image yet ({entry['status']})", err=True)
        for item_id in dropped:
            click.echo(f"item {item_id}: no image, dropped by the safety checker", err=True)
    if missing:
        raise Reported(CheckFailed(f"{len(missing)} item(s) have no image yet"))
