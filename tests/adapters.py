"""Tiny adapter files for queue tests: a kohya-ss LoRA for the tiny model and an A1111
textual-inversion embedding, written with the builders the model tests check against
diffusers (tests/sdmodel/test_lora.py, test_embeddings.py)."""
from __future__ import annotations

import hashlib
from pathlib import Path

from safetensors.torch import save_file

from sdq.sdmodel.pipeline import load_pipeline
from tests.sdmodel.test_embeddings import vectors
from tests.sdmodel.test_lora import kohya_file, random_updates


def write_loras(folder: Path, checkpoint: Path, names: dict[str, int]) -> dict[str, Path]:
    """One kohya-ss LoRA per name (its value: the random seed), for the tiny model."""
    folder.mkdir(parents=True, exist_ok=True)
    pipe = load_pipeline(checkpoint, device="cpu", dtype="fp32")
    return {name: kohya_file(folder / f"{name}.safetensors", pipe,
                             random_updates(pipe, seed=seed, rank=4, strength=0.5),
                             alpha=2.0, spelling="diffusers")
            for name, seed in names.items()}


def write_embedding(folder: Path, name: str, seed: int = 1, count: int = 2) -> Path:
    """An A1111 `.safetensors` embedding of `count` random vectors for the tiny text encoder."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.safetensors"
    save_file({"emb_params": vectors(count, seed)}, str(path))
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
