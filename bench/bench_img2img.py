"""Claim: image-to-image costs one VAE encode per image over text-to-image at the same number
of steps run.

One random-weight SD v1 model (`bench_sdmodel.model_file`: the tiny test model, or SD v1.5's
full-size networks) runs the same requests three ways, interleaved, best of `--repeats`:
text-to-image with `--steps-run` steps; image-to-image at strength 0.5 with twice the steps,
so that int(steps * strength) is the same number of steps run; and the init images' encode
alone (`Pipeline.encode`: resize, autoencoder encoder, posterior sample). Seconds per image,
wall and CPU (the process's, all threads): on a shared machine the CPU time is the steadier.

    python -m bench.bench_img2img --size tiny
    python -m bench.bench_img2img --size full --width 256 --height 256 --steps-run 5
"""
from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository's `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._checkout import use_checkout  # noqa: E402

use_checkout()
print("bench_img2img: loading torch ...", file=sys.stderr, flush=True)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from bench.bench_sdmodel import PROMPTS, model_file  # noqa: E402
from sdq.sdmodel.pipeline import DTYPES, Request, load_pipeline  # noqa: E402

STRENGTH = 0.5


def init_images(count: int, width: int, height: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
            for _ in range(count)]


def timed(run: Callable[[], object]) -> tuple[float, float]:
    """Wall and CPU seconds of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    run()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=("tiny", "full"), default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=DTYPES, default="fp32")
    parser.add_argument("--sampler", default="ddim")
    parser.add_argument("--steps-run", type=int, default=5)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model-dir", type=Path, default=Path("/tmp/sdq-bench"))
    args = parser.parse_args()

    pipe = load_pipeline(model_file(args.size, 0, args.model_dir), device=args.device,
                         dtype=args.dtype)
    n = args.batch_size
    requests = [Request(PROMPTS[i % len(PROMPTS)], "", seed=i) for i in range(n)]
    images = init_images(n, args.width, args.height)
    shape = dict(sampler=args.sampler, width=args.width, height=args.height)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

    def txt2img() -> None:
        pipe.generate(requests, steps=args.steps_run, **shape)
        sync()

    def img2img() -> None:
        pipe.generate(requests, init_images=images, strength=STRENGTH,
                      steps=round(args.steps_run / STRENGTH), **shape)
        sync()

    def encode() -> None:
        generators = [torch.Generator("cpu").manual_seed(r.seed) for r in requests]
        pipe.encode(images, generators, args.width, args.height)
        sync()

    for run in (txt2img, img2img, encode):  # warm-up
        run()
    runs: dict[str, list[tuple[float, float]]] = {"txt2img": [], "img2img": [], "encode": []}
    for _ in range(args.repeats):
        for name, run in (("txt2img", txt2img), ("img2img", img2img), ("encode", encode)):
            runs[name].append(timed(run))
    print(f"{args.size} model, {args.width}x{args.height}, {args.sampler}, {args.steps_run} steps "
          f"run, batch {n}, {args.device} {args.dtype}, {torch.get_num_threads()} threads; "
          f"best of {args.repeats}, seconds per image")
    print("| clock | txt2img | img2img | img2img - txt2img | encode alone | encode / txt2img |")
    print("|---|---|---|---|---|---|")
    for column, clock in ((0, "wall"), (1, "CPU")):
        best = {name: min(r[column] for r in values) / n for name, values in runs.items()}
        extra = best["img2img"] - best["txt2img"]
        print(f"| {clock} | {best['txt2img']:.2f} | {best['img2img']:.2f} | {extra:+.2f} "
              f"| {best['encode']:.2f} | {best['encode'] / best['txt2img']:.1%} |")

if __name__ == "__main__":
    main()
