"""`sdq reproduce`: make an image again from its record and compare it with the stored one."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import click

from sdq.cli.common import configured_storage, database_session, load_settings, output_options
from sdq.cli.errors import BAD_INPUT, CommandFailed, Reported
from sdq.cli.options import adapter_settings
from sdq.core.errors import CheckFailed, NotFound
from sdq.db.models import Status
from sdq.db.queries import get_item
from sdq.core.params import short_hash
from sdq.core.settings import DTYPE_NAMES


@click.command()
@click.argument("item_id", metavar="ITEM", type=int)
@click.option("--batch", "in_batch", is_flag=True,
              help="Regenerate it with the items it was batched with, in their positions "
                   "(identical pixels are expected on the same device and software).")
@click.option("--model", "model_ref", metavar="REF",
              help="Load the model from here instead of the recorded source (its sha256 must "
                   "match the item's).")
@click.option("--device", help="cpu, cuda, cuda:1, mps ... (default: SDQ_DEVICE, else the best).")
@click.option("--dtype", type=click.Choice(DTYPE_NAMES),
              help="Weights' precision (default: SDQ_DTYPE, else fp16 on GPUs, fp32 on the CPU).")
@click.option("--lora-dir", "lora_dirs", multiple=True,
              type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Folder the item's LoRAs are looked up in; repeatable [default: $SDQ_LORA_DIR].")
@click.option("--embeddings-dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Folder of the item's embeddings [default: $SDQ_EMBEDDINGS_DIR].")
@output_options("json")
def reproduce(item_id: int, in_batch: bool, model_ref: str | None, device: str | None,
              dtype: str | None, lora_dirs: tuple[Path, ...], embeddings_dir: Path | None,
              output: str | None) -> None:
    """Regenerate ITEM from its recorded prompt, seed, sampler, steps, guidance, size and
    model (by sha256), and compare the pixels with the stored image.

    Alone by default: the image differs from the stored one by at most about one level when
    it was made in a batch. With --batch, its whole recorded batch is regenerated in the
    recorded order, which on the same device and software gives identical pixels. The stored
    image's invisible watermark is applied to the new pixels before comparing. Exit status 0
    when identical, 1 when not; 3 when a LoRA or embedding the item was made with is not in
    --lora-dir / --embeddings-dir with its recorded sha256 (another file would make another
    image).

    \b
    Examples:
      sdq reproduce 1234
      sdq reproduce 1234 --batch --json
      sdq reproduce 1234 --model ~/models/v1-5-pruned-emaonly.safetensors --device cuda
    """
    from sdq.jobs.reproduce import check_adapters, compare, composition, regenerate
    from sdq.sdmodel.pipeline import load_pipeline

    settings = adapter_settings(load_settings(need_broker=False), lora_dirs, embeddings_dir)
    with database_session(settings) as session:
        item = get_item(session, item_id)
        if item.status is not Status.DONE or not item.image_key:
            dropped = ", dropped by the safety checker" if item.safety_action == "dropped" else ""
            raise click.ClickException(f"item {item_id} has no stored image "
                                       f"(status {item.status.value}{dropped})")
        if item.safety_action == "blacked":
            raise click.ClickException(f"item {item_id}'s stored image was blacked out by the "
                                       "safety checker: there is nothing to compare with")
        if item.model is None:
            raise click.ClickException(f"item {item_id} records no model")
        members = composition(session, item, in_batch=in_batch)
        position = members.index(item)
        try:
            check_adapters(members, settings.lora_dir, settings.embeddings_dir)
        except NotFound as exc:
            raise CommandFailed.of(exc) from None
        sha256, source = item.model.sha256, model_ref or item.model.source_uri
        image_key, batch_id, recorded_device = item.image_key, item.batch_id, item.device
    if not source:
        raise click.ClickException(f"model {short_hash(sha256)} has no recorded source; "
                                   "pass --model with a local copy")
    stored = configured_storage(settings).get(image_key)
    try:
        pipe = load_pipeline(source, device=device or settings.device,
                             dtype=dtype or settings.dtype,
                             hash_cache=settings.home / "hashes.json", fast=settings.fast_path_spec,
                             lora_dirs=settings.lora_dir, embeddings_dir=settings.embeddings_dir)
    except (ValueError, LookupError, OSError) as exc:
        raise CommandFailed.of(exc, f"cannot load model {source}", code=BAD_INPUT) from None
    if pipe.sha256 != sha256:
        raise click.ClickException(f"{source} is model {pipe.short_hash}, item {item_id} was made "
                                   f"with {short_hash(sha256)}; pass --model with that model")
    comparison = compare(stored, regenerate(pipe, members)[position])
    record: dict[str, Any] = {
        "item": item_id, "batch": batch_id if in_batch else None, "batch_size": len(members),
        "position": position, "device": pipe.device, "dtype": pipe.dtype,
        "recorded_device": recorded_device, **asdict(comparison),
    }
    if output == "json":
        click.echo(json.dumps(record, indent=2))
    else:
        click.echo(_summary(record))
    if not comparison.identical:
        raise Reported(CheckFailed(f"item {item_id} differs from its stored image"))


def _summary(r: dict[str, Any]) -> str:
    how = (f"in its batch {r['batch']} (position {r['position']} of {r['batch_size']})"
           if r["batch"] else "alone")
    where = f"regenerated {how} on {r['device']} ({r['dtype']})"
    if r["identical"]:
        return f"item {r['item']}: identical pixels, {where}"
    return (f"item {r['item']}: differs, largest difference {r['max_difference']} level(s) in "
            f"{r['differing_pixels']} of {r['pixels']} pixels, {where}; recorded on "
            f"{r['recorded_device'] or 'an unknown device'}")
