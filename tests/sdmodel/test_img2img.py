"""Image-to-image parity with diffusers' StableDiffusionImg2ImgPipeline on a tiny model of the
real architecture, every sampler, and the per-image seed contract (batch invariance)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sdq.core.params import ParamError
from sdq.sdmodel.diffusers_reference import reference_pipeline, reference_scheduler
from sdq.sdmodel.pipeline import Pipeline, Request, load_pipeline
from sdq.sdmodel.samplers import SAMPLERS

from .test_pipeline import LATENT_TOL, PIXEL_TOL, REQUESTS, pixels

STEPS = 10
EVERY_SAMPLER = [name if name in ("ddim", "plms", "euler_a") else
                 pytest.param(name, marks=pytest.mark.slow) for name in SAMPLERS]
"""Three samplers (a VP one with eta noise, PLMS's own start, an ancestral VE one) run by
default; the other three take the same paths and run with the slow tests."""


@pytest.fixture(scope="module")
def pipe(tiny_checkpoint) -> Pipeline:
    return load_pipeline(tiny_checkpoint, device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    return reference_pipeline(tiny_checkpoint, img2img=True)


def init_image(width: int, height: int, seed: int) -> Image.Image:
    """A photo-like init image: smooth colour gradients, a bright disc and a little noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    disc = ((x - width * 0.6) ** 2 + (y - height * 0.4) ** 2 < (min(width, height) / 4) ** 2)
    rgb = np.stack([x / width * 200, y / height * 180, 120 + 60 * np.sin(x / 5)], axis=-1)
    rgb = rgb + 70 * disc[..., None] + rng.normal(0, 8, rgb.shape)
    return Image.fromarray(rgb.clip(0, 255).astype(np.uint8))


def run_reference(ref, sampler: str, requests: list[Request], images: list[Image.Image],
                  strength: float, eta: float = 0.0):
    """diffusers' latents and 8-bit images for the same requests (one shared guidance scale):
    the pipeline's latents, decoded as the pipeline decodes them."""
    ref.scheduler = reference_scheduler(sampler)
    kwargs = dict(
        prompt=[r.prompt for r in requests], negative_prompt=[r.negative_prompt for r in requests],
        image=images, strength=strength, num_inference_steps=STEPS, guidance_scale=requests[0].cfg,
        generator=[torch.Generator("cpu").manual_seed(r.seed) for r in requests],
    )
    if sampler == "ddim":
        kwargs["eta"] = eta
    latents = ref(**kwargs, output_type="latent").images
    with torch.inference_mode():
        decoded = ref.vae.decode(latents / ref.vae.config.scaling_factor).sample
    images = ref.image_processor.postprocess(decoded, output_type="np")
    return latents, (images * 255).round().astype(np.uint8)


def check_parity(pipe, reference, sampler, requests, images, size, strength, eta=0.0):
    width, height = size
    ref_latents, ref_images = run_reference(reference, sampler, requests, images, strength, eta)
    latents = pipe.denoise(requests, sampler=sampler, steps=STEPS, width=width, height=height,
                           eta=eta, init_images=images, strength=strength)
    assert latents.shape == (len(requests), 4, height // 8, width // 8)
    gap = (latents - ref_latents).abs().max().item()
    assert gap < LATENT_TOL, gap
    ours = pixels(pipe.decode(latents))
    assert ours.shape[1:3] == (height, width)
    assert np.abs(ours - ref_images).max() <= PIXEL_TOL


@pytest.mark.parametrize("sampler", EVERY_SAMPLER)
@pytest.mark.parametrize("strength", [0.3, 1.0])
@pytest.mark.parametrize(("image_size", "size"), [((64, 64), (64, 64)), ((96, 64), (96, 64)),
                                                  ((70, 61), (64, 56))])
def test_matches_diffusers(pipe, reference, sampler, strength, image_size, size):
    """Two sizes and one that is not a multiple of 8, which diffusers (and sdq, given the
    floored size) resizes down to one."""
    images = [init_image(*image_size, seed=1), init_image(*image_size, seed=2)]
    eta = 0.7 if sampler == "ddim" else 0.0
    check_parity(pipe, reference, sampler, REQUESTS, images, size, strength, eta)


@pytest.mark.parametrize("sampler", [s if s == "plms" else pytest.param(s, marks=pytest.mark.slow)
                                     for s in SAMPLERS])
def test_matches_diffusers_one_step_in(pipe, reference, sampler):
    """Strength 0.9 of 10 steps starts at step 1, where diffusers' PLMS redoes its first step
    from a level the leading schedule does not have (`samplers._plms_calls`)."""
    images = [init_image(64, 64, seed=3)] * 2
    check_parity(pipe, reference, sampler, REQUESTS, images, (64, 64), 0.9)


def test_unguided_and_mixed_guidance(pipe, reference):
    requests = [Request(r.prompt, "", r.seed, 1.0) for r in REQUESTS]
    images = [init_image(64, 64, seed=4), init_image(64, 64, seed=5)]
    check_parity(pipe, reference, "euler_a", requests, images, (64, 64), 0.6)


@pytest.mark.parametrize("sampler", ["euler_a", "ddim", "dpmpp_2m"])
def test_image_is_the_same_alone_or_anywhere_in_a_batch(pipe, sampler):
    target = Request("a lighthouse at dusk", "fog", seed=12345, cfg=6.0)
    start = init_image(96, 64, seed=6)
    eta = 0.5 if sampler == "ddim" else 0.0
    settings = dict(sampler=sampler, steps=8, width=96, height=64, eta=eta, strength=0.6)
    alone = pixels(pipe.generate([target], init_images=[start], **settings))[0]
    neighbours = [(Request("a bowl of fruit", "", seed=7, cfg=1.0), init_image(96, 64, seed=8)),
                  (Request("city at night", "rain", seed=99, cfg=9.0), init_image(50, 90, seed=9))]
    for position in (0, 1, 2):
        batch = [*neighbours[:position], (target, start), *neighbours[position:]]
        out = pipe.generate([r for r, _ in batch], init_images=[i for _, i in batch], **settings)
        assert np.abs(pixels(out)[position] - alone).max() <= 1
    again = pixels(pipe.generate([target], init_images=[start], **settings))[0]
    assert np.array_equal(again, alone)


def test_the_init_image_and_strength_shape_the_result(pipe):
    """Another init image or another strength makes another image. (Nearness to the init
    image cannot be asked of random weights: their autoencoder reconstructs nothing.)"""
    request = Request("a red cube", seed=1)
    settings = dict(sampler="euler", steps=10, width=64, height=64)
    start = init_image(64, 64, seed=10)

    def run(image: Image.Image, strength: float) -> np.ndarray:
        return pixels(pipe.generate([request], init_images=[image], strength=strength, **settings))[0]

    low = run(start, 0.2)
    assert np.abs(run(start, 1.0) - low).mean() > 1.0
    assert np.abs(run(init_image(64, 64, seed=11), 0.2) - low).mean() > 1.0


@pytest.mark.parametrize(("strength", "message"), [
    (0.0, "strength: must be above 0"), (1.5, "strength: must be above 0"),
    (float("nan"), "strength: expected a number"), (0.05, "runs no step"),
])
def test_bad_strengths_are_refused(pipe, strength, message):
    with pytest.raises(ParamError, match=message):
        pipe.generate([Request("x")], init_images=[init_image(64, 64, seed=0)],
                      strength=strength, steps=10, width=64, height=64)


def test_init_images_must_match_the_requests(pipe):
    with pytest.raises(ValueError, match="one init image per request"):
        pipe.generate([Request("x"), Request("y")], init_images=[init_image(64, 64, seed=0)],
                      strength=0.5, steps=4, width=64, height=64)
    with pytest.raises(ValueError, match="strength without init images"):
        pipe.generate([Request("x")], strength=0.5, steps=4, width=64, height=64)
