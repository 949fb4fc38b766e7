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
import json
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from bench.timing import best_ms
from sdq.sdmodel.safety import load_safety_checker, preprocess
from tests.conftest import random_fp16
from tests.worker.images.samples import photo

VIT_L14 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
               patch_size=14, image_size=224, hidden_act="quick_gelu")
PROJECTION, CONCEPTS, SPECIAL = 768, 17, 3


def save_full_size_checker(folder: Path) -> None:
    """config.json and random fp16 weights in the layout diffusers saves."""
    from transformers import CLIPConfig, CLIPVisionConfig, CLIPVisionModel

    config = CLIPConfig(vision_config=VIT_L14, projection_dim=PROJECTION).to_dict()
    config["architectures"] = ["StableDiffusionSafetyChecker"]
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    with torch.device("meta"):
        vision = CLIPVisionModel(CLIPVisionConfig(**VIT_L14))
    generator = torch.Generator().manual_seed(0)
    weights = {f"vision_model.{k}": v for k, v in random_fp16(vision, generator).items()
               if not k.endswith("position_ids")}
    head = {"visual_projection.weight": (PROJECTION, VIT_L14["hidden_size"]), "concept_embeds": (CONCEPTS, PROJECTION),
            "concept_embeds_weights": (CONCEPTS,), "special_care_embeds": (SPECIAL, PROJECTION),
            "special_care_embeds_weights": (SPECIAL,)}
    weights.update({k: torch.randn(shape, generator=generator).half() for k, shape in head.items()})
    save_file(weights, str(folder / "model.safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        save_full_size_checker(Path(tmp) / "safety_checker")
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
