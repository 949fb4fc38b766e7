"""Claim: sdq's pipeline does diffusers' work (same model, sampler, steps and size) in less time.

One random-weight SD v1 model, written once as an LDM single-file checkpoint, is loaded by
sdq's `load_pipeline` and, through diffusers' own single-file converters, by diffusers'
`StableDiffusionPipeline` (SD 1.5 scheduler config, no safety checker, its defaults otherwise).
Both run the same requests (one prompt, an empty negative prompt and a seed per image, guidance
7.5) with the same torch threads, after one warm-up run each per batch size, interleaved, and
the table shows medians over the repeats: seconds per denoising step (between step callbacks),
seconds per image (text encoding + denoising + VAE decode to 8-bit images, divided by the
batch), images per second, and sdq's time as a fraction of diffusers'. `max dpx` is the largest
8-bit pixel difference between the two sides' images: near 0 means they did the same work.

    python bench/bench_sdmodel.py --size tiny --steps 20 --batch-sizes 1 4
    python bench/bench_sdmodel.py --size full --steps 5                      (CPU, 256x256)
    python bench/bench_sdmodel.py --size full --device cuda --dtype fp16 \\
        --width 512 --height 512 --steps 50 --batch-sizes 1 8 16 --json out.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository's `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._checkout import use_checkout  # noqa: E402

use_checkout()
print("bench_sdmodel: loading torch and diffusers ...", file=sys.stderr, flush=True)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from sdq.sdmodel import clip  # noqa: E402
from sdq.sdmodel.modelfiles import PREFIXES  # noqa: E402
from sdq.sdmodel.configs import UNetConfig, VAEConfig  # noqa: E402
from sdq.sdmodel.pipeline import DTYPES, Request, load_pipeline  # noqa: E402
from sdq.sdmodel.samplers import SAMPLERS  # noqa: E402
from sdq.sdmodel.tiny import (  # noqa: E402
    TINY_UNET,
    TINY_VAE,
    build_tiny_networks,
    full_size_networks_fp16,
    ldm_checkpoint,
)

CONFIGS = {"tiny": (TINY_UNET, TINY_VAE), "full": (UNetConfig(), VAEConfig())}
PROMPTS = ["a photograph of an astronaut riding a horse", "a lighthouse on a cliff at dusk, oil painting",
           "a bowl of ripe fruit on a wooden table", "portrait of an old fisherman, dramatic light"]
GUIDANCE = 7.5
Run = Callable[[list[Request]], tuple[list[float], np.ndarray]]


def model_file(size: str, seed: int, folder: Path) -> Path:
    """The random model as an LDM single-file checkpoint, written on first use: the tiny test
    model (fp32, 68 MB) or SD v1.5's full-size networks with N(0, 0.02) fp16 weights (2.1 GB)."""
    path = folder / f"sdq-bench-{size}-seed{seed}.safetensors"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        networks = build_tiny_networks(seed) if size == "tiny" else full_size_networks_fp16(seed)
        tmp = path.with_suffix(".partial")
        save_file(ldm_checkpoint(*networks), str(tmp))
        tmp.replace(path)
    return path


def synchronizer(device: str) -> Callable[[], None]:
    return torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)


def sdq_runner(path: Path, args: argparse.Namespace) -> Run:
    pipe = load_pipeline(path, device=args.device, dtype=args.dtype, fast=args.fast_path)
    sync = synchronizer(args.device)

    def run(requests: list[Request]) -> tuple[list[float], np.ndarray]:
        stamps = [time.perf_counter()]

        def on_step(i: int, total: int) -> None:
            sync()
            stamps.append(time.perf_counter())

        images = pipe.generate(requests, sampler=args.sampler, steps=args.steps, width=args.width,
                               height=args.height, on_step=on_step)
        sync()
        stamps.append(time.perf_counter())
        return stamps, np.stack([np.asarray(im) for im in images])

    return run


def diffusers_runner(path: Path, size: str, args: argparse.Namespace) -> Run:
    import diffusers

    from sdq.sdmodel.diffusers_reference import reference_scheduler, to_diffusers

    checkpoint = load_file(str(path))
    text_config = clip.text_config_from_state_dict(checkpoint, PREFIXES["text_encoder"])
    unet, vae, text = to_diffusers(checkpoint, *CONFIGS[size], text_config)
    del checkpoint
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=text, tokenizer=clip.load_tokenizer(), unet=unet,
        scheduler=reference_scheduler(args.sampler),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    ).to(args.device, DTYPES[args.dtype])
    pipe.set_progress_bar_config(disable=True)
    sync = synchronizer(args.device)

    def run(requests: list[Request]) -> tuple[list[float], np.ndarray]:
        stamps = [time.perf_counter()]

        def on_step(pipeline, i, t, kwargs):
            sync()
            stamps.append(time.perf_counter())
            return {}

        images = pipe(
            prompt=[r.prompt for r in requests], negative_prompt=[r.negative_prompt for r in requests],
            generator=[torch.Generator("cpu").manual_seed(r.seed) for r in requests],
            num_inference_steps=args.steps, guidance_scale=GUIDANCE, width=args.width, height=args.height,
            callback_on_step_end=on_step,
        ).images
        sync()
        stamps.append(time.perf_counter())
        return stamps, np.stack([np.asarray(im) for im in images])

    return run


def step_seconds(stamps: list[float]) -> float:
    """Median time between consecutive step callbacks; the first step also holds text encoding."""
    steps = stamps[1:-1]
    gaps = [b - a for a, b in zip(steps, steps[1:])]
    return statistics.median(gaps) if gaps else steps[0] - stamps[0]


def requests_for(batch: int) -> list[Request]:
    return [Request(PROMPTS[i % len(PROMPTS)], "", seed=1000 + i, cfg=GUIDANCE) for i in range(batch)]


def measure(runs: dict[str, Run], args: argparse.Namespace) -> list[dict]:
    """Warm up each side per batch size, then alternate which side goes first on each repeat."""
    rows = []
    for batch in args.batch_sizes:
        requests = requests_for(batch)
        for run in runs.values():
            run(requests)
        samples: dict[str, list[tuple[float, float]]] = {side: [] for side in runs}
        images: dict[str, np.ndarray] = {}
        for repeat in range(args.repeats):
            order = list(runs) if repeat % 2 == 0 else list(reversed(runs))
            for side in order:
                stamps, images[side] = runs[side](requests)
                samples[side].append((step_seconds(stamps), stamps[-1] - stamps[0]))
        row = {"size": args.size, "device": args.device, "dtype": args.dtype, "sampler": args.sampler,
               "steps": args.steps, "width": args.width, "height": args.height, "batch": batch,
               "threads": torch.get_num_threads(), "repeats": args.repeats,
               "max_pixel_diff": int(np.abs(images["sdq"].astype(int) - images["diffusers"]).max())}
        for side, values in samples.items():
            row[f"{side}_step_s"] = statistics.median(v[0] for v in values)
            row[f"{side}_image_s"] = statistics.median(v[1] for v in values) / batch
            row[f"{side}_image_s_all"] = [v[1] / batch for v in values]
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    head = ("| model | batch | sdq s/step | diffusers s/step | sdq s/image | diffusers s/image "
            "| sdq img/s | diffusers img/s | sdq/diffusers (per image) | max dpx |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {r['size']} {r['width']}x{r['height']} {r['steps']} {r['sampler']} {r['device']} {r['dtype']} "
            f"| {r['batch']} | {r['sdq_step_s']:.4f} | {r['diffusers_step_s']:.4f} "
            f"| {r['sdq_image_s']:.3f} | {r['diffusers_image_s']:.3f} "
            f"| {1 / r['sdq_image_s']:.2f} | {1 / r['diffusers_image_s']:.2f} "
            f"| {r['sdq_image_s'] / r['diffusers_image_s']:.2f}x | {r['max_pixel_diff']} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--size", choices=CONFIGS, default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=DTYPES, default="fp32")
    parser.add_argument("--sampler", choices=SAMPLERS, default="ddim")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--model-dir", type=Path, default=Path("/tmp/sdq-bench"),
                        help="where the random checkpoint is written once (full: 2.1 GB)")
    parser.add_argument("--fast-path", default="default", help="sdq's fast path (SDQ_FAST_PATH syntax)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    path = model_file(args.size, args.seed, args.model_dir)
    runs = {"sdq": sdq_runner(path, args), "diffusers": diffusers_runner(path, args.size, args)}
    rows = measure(runs, args)
    print(f"torch {torch.__version__}, {args.threads} threads, {args.device}\n")
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
