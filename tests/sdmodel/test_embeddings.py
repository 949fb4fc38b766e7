"""Textual-inversion embeddings: the file formats people share, the names prompts use them by,
clean errors for files sdq cannot use, and images equal to diffusers' `load_textual_inversion`."""
from __future__ import annotations

import copy
import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from sdq.core.errors import InvalidInput
from sdq.sdmodel import clip
from sdq.sdmodel.embeddings import EmbeddingRegistry
from sdq.sdmodel.pipeline import Pipeline, Request, load_pipeline

from sdq.sdmodel.diffusers_reference import reference_pipeline
from .test_pipeline import LATENT_TOL, PIXEL_TOL, pixels, run_reference

WIDTH = 64
"""The tiny text encoder's width (tests/conftest.py)."""


def vectors(n: int | None, seed: int, width: int = WIDTH) -> torch.Tensor:
    """Random vectors as large as the tiny model's token embeddings, so they change images."""
    shape = (width,) if n is None else (n, width)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def write_formats(folder: Path) -> dict[str, torch.Tensor]:
    """One embedding per format: A1111 .safetensors and .pt, diffusers .bin and .safetensors."""
    folder.mkdir(exist_ok=True)
    written = {"embst": vectors(2, 1), "embpt": vectors(3, 2), "embbin": vectors(None, 3),
               "embdiff": vectors(None, 4)}
    save_file({"emb_params": written["embst"]}, str(folder / "embst.safetensors"))
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": written["embpt"]},
                "name": "embpt", "step": 3000, "sd_checkpoint": "a9263745", "sd_checkpoint_name": "v1-5"},
               folder / "embpt.pt")
    torch.save({"<embbin>": written["embbin"]}, folder / "embbin.bin")
    save_file({"<embdiff>": written["embdiff"]}, str(folder / "embdiff.safetensors"))
    return written


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("embeddings")
    write_formats(path)
    return path


def test_every_format_reads_as_its_vectors_with_its_file_hash(folder) -> None:
    written = write_formats(folder)
    registry = EmbeddingRegistry(folder, clip.load_tokenizer(), WIDTH)
    assert registry.names == ["embbin", "embdiff", "embpt", "embst"]
    for name, expected in written.items():
        embedding = registry.get(name)
        assert torch.equal(embedding.vectors, expected.reshape(-1, WIDTH))
        assert embedding.sha256 == hashlib.sha256(embedding.path.read_bytes()).hexdigest()
        assert embedding.path.stem == name


def test_a_prompt_uses_an_embedding_where_its_name_is_a_run_of_tokens(folder) -> None:
    registry = EmbeddingRegistry(folder, clip.load_tokenizer(), WIDTH)
    used = registry.used_in("(EMBPT:1.2), a cat BREAK embst embst,embbin")
    assert [e.name for e in used] == ["embpt", "embst", "embbin"]
    assert registry.used_in("embpts, embs, tembpt, emb pt, a cat") == []


def test_bad_files_are_named_when_a_prompt_uses_them(tmp_path) -> None:
    class Payload:
        def __reduce__(self):
            return (print, ("unpickled code ran",))

    save_file({"emb_params": vectors(2, 0, width=32)}, str(tmp_path / "narrow.safetensors"))
    save_file({"emb_params": torch.full((2, WIDTH), float("nan"))}, str(tmp_path / "nan.safetensors"))
    torch.save({"string_to_param": {"*": vectors(1, 0)}, "extra": Payload()}, tmp_path / "code.pt")
    save_file({"clip_l": vectors(1, 0), "clip_g": vectors(1, 0)}, str(tmp_path / "xl.safetensors"))
    save_file({"a": vectors(1, 0), "b": vectors(1, 0)}, str(tmp_path / "two.safetensors"))
    save_file({"emb_params": vectors(76, 0)}, str(tmp_path / "huge.safetensors"))
    save_file({"emb_params": torch.ones(2, WIDTH, dtype=torch.int32)}, str(tmp_path / "ints.safetensors"))
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    (tmp_path / "empty.pt").write_bytes(b"")
    save_file({"emb_params": vectors(1, 0)}, str(tmp_path / "twice.safetensors"))
    (tmp_path / "more").mkdir()
    save_file({"emb_params": vectors(1, 1)}, str(tmp_path / "more" / "twice.safetensors"))
    save_file({"emb_params": vectors(1, 1)}, str(tmp_path / "more" / "TWICE.pt"))

    registry = EmbeddingRegistry(tmp_path, clip.load_tokenizer(), WIDTH)
    assert registry.used_in("a cat") == []
    expected = {
        "narrow": r"narrow\.safetensors: vectors 32 wide: this model's text encoder takes 64",
        "nan": r"nan\.safetensors: vectors hold NaN or infinite values",
        "code": r"code\.pt: refused to unpickle: it references (builtins\.)?print,",
        "xl": r"xl\.safetensors: an SDXL embedding",
        "two": r"two\.safetensors: not a textual-inversion embedding",
        "huge": r"huge\.safetensors: vectors of shape \(76, 64\): expected \(1 to 75 vectors",
        "ints": r"ints\.safetensors: vectors of type torch\.int32",
        "junk": r"junk\.safetensors: unreadable \.safetensors file",
        "twice": r"embedding names TWICE, twice read as the same tokens",
    }
    for name, message in expected.items():
        with pytest.raises(InvalidInput, match=message):
            registry.used_in(f"a photo of {name}")
    assert "empty" not in registry.names
    with pytest.raises(InvalidInput, match=r"embedding 'twice' is ambiguous: .*twice\.safetensors, "):
        registry.get("twice")
    with pytest.raises(InvalidInput, match="embeddings folder .*nowhere: not a directory"):
        EmbeddingRegistry(tmp_path / "nowhere", clip.load_tokenizer())


@pytest.fixture(scope="module")
def pipe(tiny_checkpoint, folder) -> Pipeline:
    return load_pipeline(tiny_checkpoint, device="cpu", dtype="fp32", embeddings_dir=folder)


PROMPT = "a photo of embpt and embst, embbin in the embdiff"
NEGATIVE = "embst, blurry"


def test_images_match_diffusers_load_textual_inversion(pipe, tiny_checkpoint, folder) -> None:
    """diffusers reads each file in its own loader, gives each vector a token of its own and
    rewrites the prompt to name them all; one prompt here uses all four formats."""
    reference = reference_pipeline(tiny_checkpoint, copy.deepcopy(clip.load_tokenizer()))
    for name in ("embst", "embpt", "embbin", "embdiff"):
        (path,) = folder.glob(f"{name}.*")
        reference.load_textual_inversion(str(path), token=name)
    requests = [Request(PROMPT, NEGATIVE, seed=3, cfg=7.5), Request("embdiff cat", "embpt", seed=4, cfg=7.5)]
    settings = dict(sampler="euler", steps=4, width=64, height=64)
    ref_latents, ref_images = run_reference(reference, "euler", requests, 4, 64, 64)
    latents = pipe.denoise(requests, **settings)
    assert (latents - ref_latents).abs().max().item() < LATENT_TOL
    assert np.abs(pixels(pipe.decode(latents)) - ref_images).max() <= PIXEL_TOL

    as_words = Pipeline(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, sha256=pipe.sha256,
                        name=pipe.name, device="cpu", dtype="fp32").denoise(requests, **settings)
    assert (as_words - latents).abs().max().item() > 50 * LATENT_TOL


def test_a_registry_for_another_width_is_refused(pipe, folder) -> None:
    with pytest.raises(ValueError, match="embeddings read for a 768-wide text encoder; this one is 64"):
        pipe.set_embeddings(EmbeddingRegistry(folder, pipe.tokenizer, 768))
