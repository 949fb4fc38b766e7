"""`sdq generate`: one-shot local text-to-image, like the reference txt2img script."""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from sdq.cli.common import database_session, load_settings, output_options
from sdq.cli.errors import BAD_INPUT, FAILED, CommandFailed
from sdq.cli.options import (
    adapter_options,
    adapter_settings,
    as_option_errors,
    check_on_flag,
    generation_options,
    safety_options,
)
from sdq.cli.progress import ProgressLine
from sdq.core.init_image import DEFAULT_STRENGTH, InitImage, own_size, steps_run
from sdq.core.params import SEED_LIMIT, GenerationParams, draw_seed
from sdq.jobs.adapters import AdapterFinder
from sdq.core.settings import DTYPE_NAMES
from sdq.sdmodel.files import write_atomically
from sdq.core.settings import VAE_DTYPES


def output_paths(output: Path, count: int) -> list[Path]:
    """OUT.png for one image; OUT-0.png, OUT-1.png ... for several."""
    if count == 1:
        return [output]
    width = len(str(count - 1))
    return [output.with_name(f"{output.stem}-{i:0{width}d}{output.suffix or '.png'}") for i in range(count)]


def _init_file(path: Path | None, strength: float | None) -> Any:
    """The --init-image read and checked (`images.imagefile.read_init_image`), or None; a
    --strength without one is refused."""
    if path is None:
        if strength is not None:
            raise click.BadParameter("applies to image-to-image only: give --init-image",
                                     param_hint="'--strength'")
        return None
    from sdq.core.errors import InvalidInput
    from sdq.images.imagefile import read_init_image

    try:
        return read_init_image(path)
    except InvalidInput as exc:
        raise click.BadParameter(str(exc), param_hint="'--init-image'") from None


@click.command()
@click.argument("prompt")
@click.option("--model", "-m", "model_ref", metavar="REF",
              help="Checkpoint (.safetensors/.ckpt), diffusers folder or Hugging Face repo id "
                   "[default: $SDQ_MODEL, else SD v1.5 from the HF cache].")
@generation_options("Seed of the first image; image i gets seed+i. Random (and printed) if omitted.")
@click.option("-n", "--num-images", type=click.IntRange(1), default=1, show_default=True)
@click.option("--batch-size", type=click.IntRange(1),
              help="Images denoised together [default: $SDQ_BATCH_SIZE, else all of them, up to 8].")
@click.option("--device", type=click.Choice(["cuda", "mps", "cpu"]), help="[default: the best available]")
@click.option("--dtype", type=click.Choice(DTYPE_NAMES),
              help="[default: fp16 on GPUs, fp32 on the CPU]")
@click.option("--vae-dtype", type=click.Choice(VAE_DTYPES),
              help="The autoencoder's dtype [default: $SDQ_VAE_DTYPE, else --dtype's].")
@click.option("--no-watermark", is_flag=True, help="Do not embed the invisible watermark (recorded).")
@adapter_options
@click.option("--init-image", type=click.Path(dir_okay=False, path_type=Path),
              help="Image to image: start from this image (PNG, JPEG, WebP ...), made RGB as "
                   "diffusers does; used at its own size rounded down to a multiple of 8 unless "
                   "--width/--height are given.")
@click.option("--strength", type=float,
              help=f"With --init-image: how far from it to go, in (0, 1]; int(steps * strength) "
                   f"steps run [default: {DEFAULT_STRENGTH}].")
@safety_options()
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=Path("out.png"),
              show_default=True, help="PNG to write; with -n N, OUT-0.png ... OUT-(N-1).png.")
@output_options("json", dest="printed")
def generate(prompt: str, model_ref: str | None, negative_prompt: str, seed: int | None, sampler: str,
             steps: int, cfg: float, eta: float, width: int, height: int, prompt_syntax: str,
             clip_skip: int, num_images: int, batch_size: int | None, device: str | None,
             dtype: str | None, vae_dtype: str | None, no_watermark: bool,
             loras: tuple[str, ...], lora_dirs: tuple[Path, ...], embeddings_dir: Path | None,
             init_image: Path | None, strength: float | None,
             safety_checker: str | None, on_flag: str, output: Path, printed: str | None) -> None:
    """Generate images from PROMPT with a local model and write them as PNGs.

    Each PNG carries its provenance (an AUTOMATIC1111-style `parameters` chunk and an `sdq`
    JSON chunk) and, from 256x256 up, the invisible watermark. With a safety checker each
    image's verdict is in its `sdq` chunk; a dropped image is not written. LoRAs
    (<lora:NAME:WEIGHT> in PROMPT, --lora) come from --lora-dir, embeddings from
    --embeddings-dir; both are recorded with their hashes.

    \b
    Examples:
      sdq generate "a photograph of an astronaut riding a horse" \\
          --model v1-5-pruned-emaonly.safetensors --seed 42 -n 4 -o astronaut.png
      sdq generate "an oil painting of a harbour" --init-image photo.jpg --strength 0.6
    """
    from sdq.images.provenance import Provenance, environment_fingerprint
    from sdq.images.safety import encode_judged, judge
    from sdq.jobs.submit import identify_model, job_safety_checker, may_be_model_name
    from sdq.sdmodel import clip
    from sdq.sdmodel.img2img import Init
    from sdq.sdmodel.pipeline import DTYPES, load_pipeline
    from sdq.sdmodel.produce import produce
    from sdq.sdmodel.safety import load_safety_checker

    init = _init_file(init_image, strength)
    if init is not None:  # a side not asked for is the image's own
        given = click.get_current_context().get_parameter_source
        own_width, own_height = own_size(*init.image.size)
        width = own_width if given("width") is ParameterSource.DEFAULT else width
        height = own_height if given("height") is ParameterSource.DEFAULT else height
    base_seed = draw_seed() if seed is None else seed
    if base_seed + num_images > SEED_LIMIT:
        raise click.BadParameter(f"seed + number of images must stay below {SEED_LIMIT}",
                                 param_hint="--seed")
    with as_option_errors():
        params = [GenerationParams(prompt=prompt, negative_prompt=negative_prompt, seed=base_seed + i,
                                   sampler=sampler, steps=steps, cfg=cfg, eta=eta, width=width,
                                   height=height, prompt_syntax=prompt_syntax, clip_skip=clip_skip)
                  for i in range(num_images)]
        record = None if init is None else InitImage(
            init.sha256, init.source, DEFAULT_STRENGTH if strength is None else strength)
        if record is not None:
            steps_run(steps, record.strength)
    settings = adapter_settings(load_settings(need_broker=False), lora_dirs, embeddings_dir)
    with as_option_errors():
        found_loras, found_embeddings = AdapterFinder(
            settings.lora_dir, settings.embeddings_dir, loras).resolve(prompt, negative_prompt,
                                                                       prompt_syntax)
    try:
        checker_ref = job_safety_checker(safety_checker, settings.safety_checker)
    except ValueError as exc:
        raise CommandFailed.of(exc, "--safety-checker", code=BAD_INPUT) from None
    check_on_flag(on_flag, checker_ref)
    ref = model_ref or settings.model
    click.echo(f"Loading {ref} ...", err=True)
    if may_be_model_name(ref):
        with database_session(settings) as session:
            ref = identify_model(ref, settings.home / "hashes.json", session).ref
    try:
        pipe = load_pipeline(ref, device=device or settings.device, dtype=dtype or settings.dtype,
                             hash_cache=settings.home / "hashes.json", fast=settings.fast_path_spec,
                             vae_dtype=vae_dtype or settings.vae_dtype, lora_dirs=settings.lora_dir,
                             embeddings_dir=settings.embeddings_dir)
    except ValueError as exc:
        raise CommandFailed.of(exc, code=BAD_INPUT) from None
    checker = None
    if checker_ref is not None:
        try:
            checker = load_safety_checker(checker_ref, device=pipe.device, dtype=DTYPES[pipe.dtype],
                                          hash_cache=settings.home / "hashes.json")
        except ValueError as exc:
            raise CommandFailed.of(exc, "--safety-checker", code=BAD_INPUT) from None
    size = batch_size or settings.batch_size or min(num_images, pipe.default_batch_size(width, height))
    environment = environment_fingerprint(pipe.device, pipe.dtype, vae_dtype=pipe.vae_dtype)
    watermark = None if no_watermark else settings.watermark
    paths = output_paths(output, num_images)
    written: list[dict[str, Any]] = []
    bar = ProgressLine("generating", num_images)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", clip.PromptTruncated)
            lora_set = [(r["name"], r["weight"], r["sha256"]) for r in found_loras]
            starts = None if record is None else [Init(init.image, record.strength)] * num_images
            for produced in produce(pipe, params, batch_size=size, on_step=bar.step,
                                    loras=[lora_set] * len(params) if lora_set else None,
                                    inits=starts):
                images = produced.images
                verdicts = judge(checker, images, [on_flag] * len(images)) if checker \
                    else [None] * len(images)
                for position, (i, image, verdict) in enumerate(zip(produced.indices, images, verdicts)):
                    entry: dict[str, Any] = {"path": str(paths[i]), "seed": params[i].seed,
                                             "sha256": None, "watermark": None,
                                             "safety": verdict.to_json() if verdict else None}
                    written.append(entry)
                    png = encode_judged(image, verdict, Provenance(
                        params=params[i], model_sha256=pipe.sha256, model_name=pipe.name,
                        environment=environment, batch_position=position, safety=verdict,
                        redecoded="fp32" if position in produced.redecoded else None,
                        loras=found_loras, embeddings=found_embeddings, init=record,
                    ), watermark=watermark, level=settings.png_level)
                    if png is None:
                        entry["path"] = None
                        continue
                    write_atomically(paths[i], png.data)
                    entry.update(sha256=png.sha256, watermark=png.watermark)
                bar.advance(len(images))
    except ValueError as exc:
        raise CommandFailed.of(exc, code=FAILED) from None
    finally:
        bar.close()
    if printed == "json":
        click.echo(json.dumps({"model": pipe.name, "model_sha256": pipe.sha256,
                               "init": record.to_json() if record else None, "images": written},
                              indent=2))
    else:
        for entry in written:
            verdict = entry["safety"]
            note = f"  flagged by the safety checker: {verdict['action']}" \
                if verdict and verdict["flagged"] else ""
            click.echo(f"{entry['path'] or 'not written'}  seed {entry['seed']}{note}")
