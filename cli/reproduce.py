"""`sdq reproduce`: make an image again from its record and compare it with the stored one."""
from __future__ import annotations

from pathlib import Path

import click

from sdq.cli.common import configured_storage, database_session, load_settings, output_options, report
from sdq.cli.errors import BAD_INPUT, CommandFailed, Reported
from sdq.cli.options import adapter_settings
from sdq.core.errors import CheckFailed
from sdq.core.settings import DTYPE_NAMES


@click.command()
@click.argument("item_id", metavar="ITEM", type=int)
@click.option("--alone", is_flag=True,
              help="Regenerate the image by itself instead of in its recorded batch: passes "
                   "within one 8-bit level, which a batch's rounding can account for.")
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
def reproduce(item_id: int, alone: bool, model_ref: str | None, device: str | None,
              dtype: str | None, lora_dirs: tuple[Path, ...], embeddings_dir: Path | None,
              output: str | None) -> None:
    """Regenerate ITEM from its recorded prompt, seed, sampler, steps, guidance, size and
    model (by sha256), and compare the pixels with the stored image.

    By default the item's whole recorded batch is regenerated in the recorded order, which on
    the same device and software gives identical pixels. With --alone, the image is made by
    itself: a batch rounds its matrix products in another order, so it may differ by one
    level, which is reported as information. The stored image's invisible watermark is
    applied to the new pixels before comparing. Exit status 0 when identical (within one
    level with --alone), 1 when not; 3 when a LoRA or embedding the item was made with is not
    in --lora-dir / --embeddings-dir with its recorded sha256 (another file would make
    another image). An image-to-image item starts from its init image as stored with the
    job (by sha256), not from the file it was submitted from.

    \b
    Examples:
      sdq reproduce 1234
      sdq reproduce 1234 --alone --json
      sdq reproduce 1234 --model ~/models/v1-5-pruned-emaonly.safetensors --device cuda
    """
    from sdq.jobs.reproduce import replay, target
    from sdq.sdmodel.pipeline import load_pipeline

    settings = adapter_settings(load_settings(need_broker=False), lora_dirs, embeddings_dir)
    with database_session(settings) as session:
        wanted = target(session, item_id, alone=alone, model_ref=model_ref,
                        lora_dirs=settings.lora_dir, embeddings_dir=settings.embeddings_dir)
    storage = configured_storage(settings)
    stored = storage.get(wanted.image_key)
    starts = wanted.starts(storage)
    try:
        pipe = load_pipeline(wanted.source, device=device or settings.device,
                             dtype=dtype or settings.dtype,
                             hash_cache=settings.home / "hashes.json", fast=settings.fast_path_spec,
                             lora_dirs=settings.lora_dir, embeddings_dir=settings.embeddings_dir)
    except (ValueError, LookupError, OSError) as exc:
        raise CommandFailed.of(exc, f"cannot load model {wanted.source}", code=BAD_INPUT) from None
    outcome = replay(pipe, wanted, stored, starts)
    report(outcome.record(), outcome.summary(), output)
    if not outcome.passed:
        raise Reported(CheckFailed(f"item {item_id} differs from its stored image"))
