"""Claim: the safety checker costs N ms per 512x512 image on the CPU (full-size ViT-L/14).

Builds the real checker architecture (CLIP ViT-L/14 image tower, 24 layers of width 1024, patch
14 at 224 pixels, projection 768, 17 + 3 concepts) with random fp16 weights, saves it as a
diffusers `safety_checker/` folder, loads it through `load_safety_checker` in float32, and times
preprocessing (PIL resize, crop, normalise) and the model separately, per image, at several
batch sizes; best of N repeats.

    python -m bench.bench_safety [--repeat 3] [--batch 1 4]    (from the repository root)
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from bench.timing import best_ms
from sdq.sdmodel.safety import load_safety_checker, preprocess
from sdq.sdmodel.tiny import VIT_L14, VIT_L14_PROJECTION, photo, save_safety_checker


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        save_safety_checker(Path(tmp) / "safety_checker", VIT_L14, VIT_L14_PROJECTION, dtype=torch.float16,
                            meta=True)
        start = time.perf_counter()
        checker = load_safety_checker(Path(tmp))
        load_s = time.perf_counter() - start
    params = sum(p.numel() for p in checker.parameters())
    print(f"checker: {params / 1e6:.1f} M parameters, loaded in {load_s:.1f} s, "
          f"{torch.get_num_threads()} CPU threads, torch {torch.__version__}")
    print("| batch | preprocess ms/image | model ms/image | total ms/image |")
    print("|---|---|---|---|")
    for batch in args.batch:
        images = [photo(512, 512, seed=i) for i in range(batch)]
        pixels = preprocess(images)
        checker.score(pixels)  # warm-up: first calls allocate
        prep = best_ms(lambda: preprocess(images), args.repeat) / batch
        model = best_ms(lambda: checker.score(pixels), args.repeat) / batch
        print(f"| {batch} | {prep:.1f} | {model:.0f} | {prep + model:.0f} |")


if __name__ == "__main__":
    main()
