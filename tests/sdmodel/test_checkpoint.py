"""Loading weights: single files (.safetensors, restricted .ckpt), diffusers folders, identity
hashes, and the errors users see for broken or foreign files."""
from __future__ import annotations

import hashlib
import os
import pickle
import re
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sdq.sdmodel.modelfiles import CheckpointError, ModelNotFound, model_sha256, resolve_model_ref
from sdq.sdmodel.pipeline import Request, load_pipeline

from ..conftest import TINY_TEXT, TINY_UNET, TINY_VAE

REQUEST = [Request("a small boat on a lake", "dark", seed=3)]
SETTINGS = dict(sampler="ddim", steps=3, width=64, height=64)


@pytest.fixture(scope="module")
def weights(tiny_checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(str(tiny_checkpoint))


@pytest.fixture(scope="module")
def expected_latents(tiny_checkpoint: Path) -> torch.Tensor:
    return load_pipeline(tiny_checkpoint, device="cpu").denoise(REQUEST, **SETTINGS)


def save(tmp_path: Path, sd: dict[str, torch.Tensor], name: str = "model.safetensors") -> Path:
    path = tmp_path / name
    save_file(sd, str(path))
    return path


def test_missing_weight_is_named(tmp_path, weights):
    key = "model.diffusion_model.input_blocks.4.1.proj_in.weight"
    broken = {k: v for k, v in weights.items() if k != key}
    with pytest.raises(CheckpointError, match="missing weights: " + re.escape(key)):
        load_pipeline(save(tmp_path, broken), device="cpu")


def test_unexpected_weight_is_named(tmp_path, weights):
    extra = {**weights, "model.diffusion_model.input_blocks.1.1.gate.weight": torch.zeros(1)}
    with pytest.raises(CheckpointError, match=r"unexpected weights: model\.diffusion_model\.input_blocks\.1\.1\.gate"):
        load_pipeline(save(tmp_path, extra), device="cpu")
    stray = {**weights, "some_adapter.lora_up.weight": torch.zeros(1)}
    with pytest.raises(CheckpointError, match=r"unexpected weights: some_adapter\.lora_up\.weight"):
        load_pipeline(save(tmp_path, stray, "stray.safetensors"), device="cpu")


def test_wrong_shape_is_named(tmp_path, weights):
    key = "first_stage_model.decoder.conv_out.weight"
    bad = {**weights, key: torch.zeros(3, 32, 3, 1)}
    with pytest.raises(CheckpointError, match=re.escape(f"{key} has shape (3, 32, 3, 1), expected (3, 32, 3, 3)")):
        load_pipeline(save(tmp_path, bad), device="cpu")


def test_not_a_stable_diffusion_file(tmp_path):
    with pytest.raises(CheckpointError, match=r"no weights under model\.diffusion_model\.\*"):
        load_pipeline(save(tmp_path, {"first_stage_model.x": torch.zeros(1)}), device="cpu")


def test_ignored_keys_of_real_checkpoints_load(tmp_path, weights, expected_latents):
    """EMA copies, schedule buffers, logvar and position ids are tolerated and unused."""
    real = {**weights, "model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(1),
            "model_ema.diffusion_modelinput_blocks00weight": torch.zeros(1), "logvar": torch.zeros(1000),
            "posterior_variance": torch.zeros(1000), "alphas_cumprod_prev": torch.zeros(1000)}
    pipe = load_pipeline(save(tmp_path, real), device="cpu")
    assert torch.equal(pipe.denoise(REQUEST, **SETTINGS), expected_latents)


class ModelCheckpoint:
    """Stands in for Lightning's callback class when writing a test .ckpt like sd-v1-4.ckpt."""

    def __init__(self) -> None:
        self.monitor = "val/loss_simple_ema"
        self.best_model_score = None


def lightning_ckpt(path: Path, state_dict: dict[str, torch.Tensor]) -> None:
    """Write a .ckpt the way a Lightning training run did: wrapper dict plus pickled callback."""
    module = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")
    ModelCheckpoint.__module__ = module.__name__
    module.ModelCheckpoint = ModelCheckpoint
    names = ["pytorch_lightning", "pytorch_lightning.callbacks", module.__name__]
    for name in names[:-1]:
        sys.modules[name] = types.ModuleType(name)
    sys.modules[module.__name__] = module
    try:
        torch.save({"state_dict": state_dict, "global_step": 470000, "epoch": 6,
                    "callbacks": {ModelCheckpoint: ModelCheckpoint()}}, path)
    finally:
        for name in names:
            del sys.modules[name]


def test_lightning_ckpt_loads_through_the_restricted_unpickler(tmp_path, weights, expected_latents):
    path = tmp_path / "sd-tiny.ckpt"
    lightning_ckpt(path, weights)
    pipe = load_pipeline(path, device="cpu")
    assert torch.equal(pipe.denoise(REQUEST, **SETTINGS), expected_latents)
    assert pipe.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_ckpt_with_code_is_refused_and_nothing_runs(tmp_path, monkeypatch, weights):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": _RunsCode()}, path)
    with pytest.raises(CheckpointError, match=r"evil\.ckpt: refused to unpickle.*(posix|os)\.system"):
        load_pipeline(path, device="cpu")
    assert not (tmp_path / "pwned").exists()
    raw = tmp_path / "raw.ckpt"
    raw.write_bytes(pickle.dumps({"a": _RunsCode()}))
    with pytest.raises(CheckpointError, match="refused to unpickle"):
        load_pipeline(raw, device="cpu")
    assert not (tmp_path / "pwned").exists()


def test_diffusers_folder_loads_to_the_same_model(tmp_path, weights, expected_latents):
    """Save diffusers' conversion of the file as a diffusers folder; sdq reads it back."""
    from transformers import CLIPTextConfig

    from sdq.sdmodel import clip
    from sdq.sdmodel.diffusers_reference import to_diffusers

    unet, vae, text = to_diffusers(weights, TINY_UNET, TINY_VAE, CLIPTextConfig(**TINY_TEXT, hidden_act="quick_gelu"))
    folder = tmp_path / "tiny-diffusers"
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    text.save_pretrained(folder / "text_encoder")
    clip.load_tokenizer().save_pretrained(folder / "tokenizer")
    pipe = load_pipeline(folder, device="cpu")
    assert (pipe.denoise(REQUEST, **SETTINGS) - expected_latents).abs().max().item() < 1e-4
    assert pipe.name == "tiny-diffusers"
    (folder / "vae" / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"vae/config\.json missing"):
        load_pipeline(folder, device="cpu")


def test_model_identity_hash_and_its_cache(tmp_path):
    weights_file = save(tmp_path, {"w": torch.arange(10.0)})
    expected = hashlib.sha256(weights_file.read_bytes()).hexdigest()
    cache = tmp_path / "cache" / "hashes.json"
    assert model_sha256(weights_file, cache) == expected
    # A cache entry is trusted while path, size and mtime still match ...
    cache.write_text(cache.read_text().replace(expected, "f" * 64))
    assert model_sha256(weights_file, cache) == "f" * 64
    # ... and recomputed once the file changes.
    st = weights_file.stat()
    os.utime(weights_file, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert model_sha256(weights_file, cache) == expected

    folder = tmp_path / "folder"
    (folder / "unet").mkdir(parents=True)
    (folder / "unet" / "config.json").write_text("{}")
    (folder / "model_index.json").write_text("{}")
    (folder / ".cache").mkdir()
    (folder / ".cache" / "junk").write_text("ignored")
    empty = hashlib.sha256(b"{}").hexdigest()
    lines = f"model_index.json\0{empty}\nunet/config.json\0{empty}\n"
    assert model_sha256(folder) == hashlib.sha256(lines.encode()).hexdigest()


def test_a_file_replaced_in_place_with_its_size_and_time_kept_is_hashed_again(tmp_path):
    """`cp -p`, `rsync -t` and tar keep the size and the mtime of a file they replace."""
    path = save(tmp_path, {"w": torch.arange(10.0)})
    other = save(tmp_path, {"w": torch.arange(10.0) + 1}, "other.safetensors")
    assert path.stat().st_size == other.stat().st_size
    cache = tmp_path / "hashes.json"
    before = model_sha256(path, cache)
    st = path.stat()
    shutil.copy2(other, path)  # `cp -p other path`: the same inode, other bytes ...
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # ... and the old time
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    assert model_sha256(path, cache) == hashlib.sha256(other.read_bytes()).hexdigest() != before
    os.replace(other, path)  # a new inode, as `mv` and most copying tools make
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert model_sha256(path, cache) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_unknown_references_say_how_to_pass_a_local_checkpoint(tmp_path):
    with pytest.raises(ModelNotFound, match="no such checkpoint file"):
        resolve_model_ref(tmp_path / "missing.safetensors")
    with pytest.raises(ModelNotFound, match=r"nobody/no-such-model: not in the Hugging Face cache.*--model /path/to"):
        resolve_model_ref("nobody/no-such-model")
