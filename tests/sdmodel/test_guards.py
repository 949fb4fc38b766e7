"""The CUDA defaults that must not cost an image, exercised on the CPU: an SDPA backend order
under which attention raises (cuDNN alone: the CPU has no cuDNN kernel, as a broken cuDNN
release has none that runs), and an autoencoder that overflows in half precision only."""
from __future__ import annotations

import logging
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from sdq.sdmodel import clip
from sdq.sdmodel.fastpath import FastPath
from sdq.sdmodel.guards import SdpaOrder
from sdq.sdmodel.pipeline import Pipeline, Request
from sdq.sdmodel.tiny import build_tiny_networks

SETTINGS = dict(sampler="ddim", steps=2, width=64, height=64)
REQUESTS = [Request("a lighthouse at dusk", "", seed=7, cfg=7.5), Request("a red fox", "blurry", seed=8, cfg=3.0)]


def pixels(images) -> np.ndarray:
    return np.stack([np.asarray(image, dtype=np.int16) for image in images])


class CudnnOnly:
    """An SDPA order as the fast path gives one, naming only cuDNN; counts its uses."""

    def __init__(self) -> None:
        self.entered = 0

    @contextmanager
    def __call__(self):
        self.entered += 1
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            yield


def tiny_pipeline(**options) -> Pipeline:
    unet, vae, text = build_tiny_networks()
    return Pipeline(unet, vae, text, clip.load_tokenizer(), sha256="0" * 64, name="tiny", device="cpu",
                    dtype="fp32", **options)


def test_an_sdpa_order_that_raises_is_dropped_once_and_costs_no_image(caplog):
    plain = pixels(tiny_pipeline(fast=FastPath()).generate(REQUESTS, **SETTINGS))
    order = CudnnOnly()
    pipe = tiny_pipeline(fast=FastPath(sdpa_order=True), sdpa_order=order)
    with caplog.at_level(logging.WARNING, logger="sdq.sdmodel.guards"):
        first = pixels(pipe.generate(REQUESTS, **SETTINGS))
        again = pixels(pipe.generate(REQUESTS, **SETTINGS))
    assert np.array_equal(first, plain) and np.array_equal(again, plain)
    assert order.entered == 1, "tried once, then PyTorch's own order for good"
    assert pipe.sdpa.dropped is not None and "RuntimeError" in pipe.sdpa.dropped
    assert len(caplog.records) == 1 and "PyTorch's own order" in caplog.text


def test_an_order_that_works_is_kept_and_each_shape_is_checked_once():
    order = CudnnOnly()
    guard = SdpaOrder(order)
    calls = []
    assert [guard.run(("unet", n % 2), lambda: calls.append(1) or len(calls)) for n in range(4)] == [1, 2, 3, 4]
    assert guard.dropped is None and order.entered == 4


def test_errors_that_are_not_the_orders_reach_the_caller():
    guard = SdpaOrder(CudnnOnly())

    def out_of_memory():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    with pytest.raises(torch.OutOfMemoryError):
        guard.run("unet", out_of_memory)  # the runner splits the batch on this: not retried here

    def bad_input():
        raise ValueError("seed out of range")

    with pytest.raises(ValueError, match="seed out of range"):
        guard.run("unet", bad_input)  # fails under PyTorch's order too: not the order's fault
    assert guard.dropped is None


class OverflowingVAE(nn.Module):
    """Pixels = the first three latent channels, 8x nearest-upsampled, through an intermediate
    400² = 160 000 times larger: past fp16's largest value (65 504) wherever a latent exceeds
    0.41, so an image with such latents decodes to Inf in fp16 and exactly in float32. (Its
    weight, 400, is exact in fp16: a real VAE's weights fit; its activations overflow.)"""

    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.tensor(400.0))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        h = z[:, :3] * self.gain * self.gain
        return (h / self.gain / self.gain).repeat_interleave(8, 2).repeat_interleave(8, 3)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean = the red channel at every 8th pixel, through the same overflowing
        intermediate: pixels beyond ±0.41 (in [-1, 1]) give ±Inf in fp16; log-variance 0."""
        mean = (x[:, :1, ::8, ::8] * self.gain * self.gain / self.gain / self.gain).repeat(1, 4, 1, 1)
        return mean, torch.zeros_like(mean)


def vae_pipeline(vae_dtype: str, **options) -> Pipeline:
    unet, _, text = build_tiny_networks()
    return Pipeline(unet, OverflowingVAE(), text, clip.load_tokenizer(), sha256="0" * 64, name="tiny",
                    device="cpu", dtype="fp32", vae_dtype=vae_dtype, **options)


def test_an_image_that_overflows_in_fp16_is_decoded_again_in_fp32():
    # Latents are scaled by 1/0.18215 before decoding: 0.05 stays under 0.41, 0.2 does not.
    latents = torch.full((3, 4, 2, 2), 0.05)
    latents[1] = 0.2
    half = vae_pipeline("fp16").decode(latents)
    full = vae_pipeline("fp32").decode(latents)
    assert half.redecoded == (1,) and full.redecoded == ()
    assert np.array_equal(pixels(half), pixels(full))
    assert pixels(half)[1].min() == 255  # the overflowing image is its real decode, not black


def test_generate_records_the_redecoded_images_of_the_batch_it_returns():
    requests = [Request("a cat", "", seed=s, cfg=7.5) for s in range(3)]
    half = vae_pipeline("fp16", fast=FastPath(pad_sizes=True))
    images = half.generate(requests, **SETTINGS)  # padded to 4; the tiny UNet's latents overflow
    full = vae_pipeline("fp32", fast=FastPath(pad_sizes=True)).generate(requests, **SETTINGS)
    assert len(images) == 3 and images.redecoded == (0, 1, 2)
    assert np.array_equal(pixels(images), pixels(full))


def test_latents_that_are_not_finite_fail_instead_of_storing_black():
    latents = torch.full((2, 4, 2, 2), 0.05)
    latents[1, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"image\(s\) \[1\] .* not finite"):
        vae_pipeline("fp16").decode(latents)


def test_an_init_image_that_overflows_in_fp16_is_encoded_again_in_fp32(caplog):
    """img2img's encode has decode's guard: a white init image (pixels 1.0) overflows the fp16
    autoencoder, so its posterior is computed again in float32 and matches the fp32 pipeline
    exactly, not a latent of Inf; a grey one (0.0) stays in fp16."""
    from PIL import Image

    images = [Image.new("RGB", (16, 16), (128, 128, 128)), Image.new("RGB", (16, 16), "white")]

    def encoded(vae_dtype: str) -> torch.Tensor:
        generators = [torch.Generator("cpu").manual_seed(s) for s in (1, 2)]
        return vae_pipeline(vae_dtype).encode(images, generators, 16, 16)

    with caplog.at_level(logging.WARNING, logger="sdq.sdmodel.guards"):
        half = encoded("fp16")
    full = encoded("fp32")
    assert torch.isfinite(half).all()
    assert torch.equal(half[1], full[1])
    assert torch.allclose(half[0], full[0], atol=1e-2)
    assert "encoding overflowed in half precision for 1 image(s) of 2" in caplog.text


def test_the_vae_dtype_setting_reaches_the_pipeline(tiny_checkpoint, tmp_path):
    from sdq.core.settings import Settings, SettingsError
    from sdq.sdmodel.pipeline import load_pipeline

    config = {"SDQ_CONFIG": str(tmp_path / "none.toml")}
    assert Settings.load({**config, "SDQ_VAE_DTYPE": "bf16"}).vae_dtype == "bf16"
    assert Settings.load(config).vae_dtype is None
    with pytest.raises(SettingsError, match="SDQ_VAE_DTYPE: expected one of fp16, bf16, fp32, got 'fp8'"):
        Settings.load({**config, "SDQ_VAE_DTYPE": "fp8"})
    pipe = load_pipeline(tiny_checkpoint, device="cpu", vae_dtype="bf16")
    assert pipe.vae.decoder.conv_in.weight.dtype == torch.bfloat16
    assert pipe.unet.out[2].weight.dtype == torch.float32 and pipe.dtype == "fp32"
    assert len(pipe.generate(REQUESTS[:1], **SETTINGS)) == 1
