"""The GPU fast path's pieces, checked on the CPU: each gives the images of the plain path
(within one 8-bit level), the pre-drawn noise is the per-step noise, and the settings parse."""
from __future__ import annotations

import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch

from sdq.sdmodel.fastpath import FastPath, auto_batch_size, bucket_size
from sdq.sdmodel.pipeline import Pipeline, Request, load_pipeline
from sdq.sdmodel.samplers import sample

REQUESTS = [Request("a red cube on a table", "blurry", seed=11), Request("a lighthouse", "", seed=5, cfg=1.0),
            Request("portrait of an old fisherman", "", seed=4_000_000_000, cfg=9.0)]
SETTINGS = dict(sampler="euler_a", steps=5, width=64, height=64)


def pixels(images) -> np.ndarray:
    return np.stack([np.asarray(im) for im in images]).astype(np.int16)


@pytest.fixture(scope="module")
def pipe(tiny_checkpoint) -> Pipeline:
    return load_pipeline(tiny_checkpoint, device="cpu", dtype="fp32", fast=FastPath())


@pytest.fixture(scope="module")
def plain_images(pipe) -> np.ndarray:
    pipe.set_fast_path(FastPath())
    return pixels(pipe.generate(REQUESTS, **SETTINGS))


@pytest.mark.parametrize("piece", ["device_loop", "channels_last", "contiguous_attention"])
def test_each_piece_gives_the_plain_images(pipe, plain_images, piece):
    pipe.set_fast_path(FastPath(**{piece: True}))
    assert np.abs(pixels(pipe.generate(REQUESTS, **SETTINGS)) - plain_images).max() <= 1
    pipe.set_fast_path(FastPath())
    assert np.array_equal(pixels(pipe.generate(REQUESTS, **SETTINGS)), plain_images)


def test_padding_to_a_bucket_keeps_the_real_images(pipe):
    requests = [replace(REQUESTS[i % 3], seed=100 + i) for i in range(5)]
    pipe.set_fast_path(FastPath())
    alone = pixels(pipe.generate(requests, **SETTINGS))
    pipe.set_fast_path(FastPath(pad_sizes=True))
    padded = pipe.generate(requests, **SETTINGS)  # 5 images computed as a batch of 6
    assert len(padded) == 5
    assert np.abs(pixels(padded) - alone).max() <= 1


@pytest.mark.parametrize("sampler,eta", [("euler_a", 0.0), ("ddim", 0.6)])
def test_predrawn_noise_is_the_per_step_noise(sampler, eta):
    """Same generators, same order: the sampled latents agree bit for bit."""
    def eps_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return 0.1 * x + 0.001 * t

    def run(predraw: bool) -> torch.Tensor:
        generators = [torch.Generator().manual_seed(s) for s in (3, 1, 4)]
        noise = torch.cat([torch.randn((1, 4, 5, 7), generator=g) for g in generators])
        return sample(sampler, eps_model, noise, 12, eta=eta, generators=generators, predraw=predraw)

    assert torch.equal(run(True), run(False))
    assert not torch.equal(run(True), sample(sampler, eps_model, torch.zeros(3, 4, 5, 7), 12, eta=eta,
                                             generators=[torch.Generator().manual_seed(9)] * 3))


@pytest.mark.slow
def test_compiled_networks_give_the_plain_images(pipe, plain_images):
    torch._dynamo.reset()
    pipe.set_fast_path(FastPath(compile=True, pad_sizes=True))
    compiled = pixels(pipe.generate(REQUESTS, **SETTINGS))
    pipe.set_fast_path(FastPath())
    assert np.abs(compiled - plain_images).max() <= 1


def test_settings_strings():
    assert FastPath.parse("off", "cuda") == FastPath()
    cuda = FastPath.parse("default", "cuda")
    assert cuda.channels_last and cuda.device_loop and not cuda.compile and not cuda.cuda_graphs
    assert not FastPath.parse("default", "cpu").channels_last
    edited = FastPath.parse("default,-channels_last,+compile", "cuda:1")
    assert edited == replace(cuda, channels_last=False, compile=True)
    assert FastPath.parse("+compile", "cuda") == replace(cuda, compile=True)
    assert FastPath.parse(edited.spec(), "cpu") == edited
    with pytest.raises(ValueError, match="'turbo'.*device_loop"):
        FastPath.parse("default,turbo", "cuda")


def test_fastpath_imports_without_torch():
    code = "import sys, sdq.sdmodel.fastpath; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_bucket_sizes():
    assert [bucket_size(n) for n in (1, 2, 3, 4, 5, 7, 9, 13, 17, 25, 33)] == [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48]
    assert all(n <= bucket_size(n) < 1.5 * n + 1 for n in range(1, 200))


def test_auto_batch_size():
    gib = 2**30
    assert auto_batch_size(0) == 1  # never zero: the runner halves on out-of-memory
    assert auto_batch_size(8 * gib) == 7  # (8 - 2 GiB reserve) * 0.8 / 700 MiB
    assert auto_batch_size(130 * gib) == 32  # an H200 after loading: capped
    sizes = [auto_batch_size(g * gib) for g in range(1, 40)]
    assert sizes == sorted(sizes)
    assert auto_batch_size(24 * gib, 768, 768) < auto_batch_size(24 * gib)
    assert auto_batch_size(24 * gib, dtype="fp32") == auto_batch_size(24 * gib) // 2


def test_settings_reach_the_pipeline(tiny_checkpoint, tmp_path):
    from sdq.core.settings import Settings

    env = {"SDQ_FAST_PATH": "off,+channels_last", "SDQ_COMPILE": "true", "SDQ_CONFIG": str(tmp_path / "none.toml")}
    spec = Settings.load(env).fast_path_spec
    assert FastPath.parse(spec, "cpu") == FastPath(channels_last=True, compile=True)
    assert Settings.load({"SDQ_CONFIG": str(tmp_path / "none.toml")}).fast_path_spec == "default"
    pipe = load_pipeline(tiny_checkpoint, device="cpu", fast="off,+channels_last")
    assert pipe.fast == FastPath(channels_last=True)
    assert pipe.unet.input_blocks[1][0].in_layers[2].weight.is_contiguous(memory_format=torch.channels_last)
