"""End-to-end parity with diffusers' StableDiffusionPipeline on a tiny model of the real
architecture, plus the properties users rely on: per-image seeds, batch invariance, sizes."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from sdq.sdmodel.diffusers_reference import reference_pipeline, reference_scheduler
from sdq.sdmodel.pipeline import Pipeline, Request, load_pipeline
from sdq.sdmodel.samplers import SAMPLERS

# Tolerances, calibrated on this tiny model in float32 on the CPU. The yardstick is the gap
# between two exact attention implementations (SDPA vs the explicit-softmax MATH backend) over
# the same 8-step run: 6e-6..2.2e-4 on latents of std 8..19 (test_attention_yardstick keeps it
# measured). sdq vs diffusers came out at 6e-6..1.6e-4, i.e. within the yardstick, and decoded
# images within one 8-bit level (a rounding boundary crossed). A wrong setting gives > 0.05.
LATENT_TOL = 1e-3
PIXEL_TOL = 1

@pytest.fixture(scope="module")
def pipe(tiny_checkpoint) -> Pipeline:
    return load_pipeline(tiny_checkpoint, device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    return reference_pipeline(tiny_checkpoint)


def run_reference(ref, sampler: str, requests: list[Request], steps: int, width: int, height: int, eta: float = 0.0):
    """diffusers' latents and 8-bit images for the same requests (one shared guidance scale)."""
    ref.scheduler = reference_scheduler(sampler)
    kwargs = dict(
        prompt=[r.prompt for r in requests],
        negative_prompt=[r.negative_prompt for r in requests],
        generator=[torch.Generator("cpu").manual_seed(r.seed) for r in requests],
        num_inference_steps=steps, guidance_scale=requests[0].cfg, width=width, height=height,
    )
    if sampler == "ddim":
        kwargs["eta"] = eta
    latents = ref(**kwargs, output_type="latent").images
    kwargs["generator"] = [torch.Generator("cpu").manual_seed(r.seed) for r in requests]
    images = ref(**kwargs, output_type="np").images
    return latents, (images * 255).round().astype(np.uint8)


def pixels(images) -> np.ndarray:
    return np.stack([np.asarray(im) for im in images]).astype(np.int16)


REQUESTS = [Request("a red cube on a table", "blurry", seed=11, cfg=7.5),
            Request("portrait of an old fisherman, oil", "", seed=4_000_000_000, cfg=7.5)]


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("size", [(64, 64), (96, 64)])
@pytest.mark.parametrize("cfg", [7.5, 1.0])
def test_matches_diffusers(pipe, reference, sampler, size, cfg):
    width, height = size
    requests = [Request(r.prompt, r.negative_prompt if cfg > 1 else "", r.seed, cfg) for r in REQUESTS]
    eta = 0.7 if sampler == "ddim" and cfg > 1 else 0.0
    ref_latents, ref_images = run_reference(reference, sampler, requests, 8, width, height, eta)
    latents = pipe.denoise(requests, sampler=sampler, steps=8, width=width, height=height, eta=eta)
    assert latents.shape == (2, 4, height // 8, width // 8)
    assert (latents - ref_latents).abs().max().item() < LATENT_TOL
    images = pipe.decode(latents)
    assert images[0].size == (width, height)
    assert np.abs(pixels(images) - ref_images).max() <= PIXEL_TOL


@pytest.mark.parametrize("sampler", ["ddim", "euler_a"])
def test_negative_control_falls_outside_tolerance(pipe, reference, sampler):
    """A deliberately wrong setting (one step more) must break parity, or the test proves nothing."""
    ref_latents, _ = run_reference(reference, sampler, REQUESTS, 8, 64, 64)
    latents = pipe.denoise(REQUESTS, sampler=sampler, steps=9, width=64, height=64)
    assert (latents - ref_latents).abs().max().item() > 50 * LATENT_TOL


def test_attention_yardstick(pipe):
    """Two exact attention implementations differ by float noise well inside LATENT_TOL."""
    settings = dict(sampler="euler_a", steps=8, width=96, height=64)
    fast = pipe.denoise(REQUESTS, **settings)
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        slow = pipe.denoise(REQUESTS, **settings)
    gap = (fast - slow).abs().max().item()
    assert 0 < gap < LATENT_TOL / 2


def test_output_depends_on_prompt_seed_and_steps(pipe):
    """Random weights can make every image alike; these tiny ones must not."""
    base = pixels(pipe.generate([Request("a red cube", seed=1)], steps=6, width=64, height=64))
    for other in (
        pipe.generate([Request("a green forest", seed=1)], steps=6, width=64, height=64),
        pipe.generate([Request("a red cube", seed=2)], steps=6, width=64, height=64),
        pipe.generate([Request("a red cube", seed=1)], steps=7, width=64, height=64),
    ):
        assert np.abs(pixels(other) - base).mean() > 1.0
    assert base.std() > 10


@pytest.mark.parametrize("sampler", ["euler_a", "ddim"])
def test_image_is_the_same_alone_or_anywhere_in_a_batch(pipe, sampler):
    target = Request("a lighthouse at dusk", "fog", seed=12345, cfg=6.0)
    eta = 0.5 if sampler == "ddim" else 0.0
    settings = dict(sampler=sampler, steps=6, width=96, height=64, eta=eta)
    alone = pixels(pipe.generate([target], **settings))[0]
    neighbours = [Request("a bowl of fruit", "", seed=7, cfg=1.0), Request("city at night", "rain", seed=99, cfg=9.0)]
    for position in (0, 1, 2):
        batch = neighbours[:position] + [target] + neighbours[position:]
        assert np.abs(pixels(pipe.generate(batch, **settings))[position] - alone).max() <= 1
    again = pixels(pipe.generate([target], **settings))[0]
    assert np.array_equal(again, alone)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (dict(width=100), "width: must be a multiple of 8"),
        (dict(height=0), "height: must be between 8 and"),
        (dict(sampler="heun"), "unknown sampler 'heun'"),
        (dict(steps=0), "steps"),
        (dict(sampler="euler", eta=0.5), "eta"),
    ],
)
def test_bad_arguments_are_refused(pipe, settings, message):
    with pytest.raises(ValueError, match=message):
        pipe.generate([Request("x")], **{"width": 64, "height": 64, "steps": 2, **settings})


def test_seed_range(pipe):
    with pytest.raises(ValueError, match="seed: must be between 0 and 4294967295"):
        pipe.generate([Request("x", seed=2**32)], steps=1, width=64, height=64)
    with pytest.raises(ValueError, match="no requests"):
        pipe.generate([], steps=1)
