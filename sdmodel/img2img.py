"""Image-to-image inputs, made exactly as diffusers' StableDiffusionImg2ImgPipeline makes them.

The pipeline's steps, in its order: the init image resized (LANCZOS, `VaeImageProcessor`) and
scaled to [-1, 1]; encoded by the autoencoder; a latent drawn from the posterior with the
image's own generator (`retrieve_latents(..., sample_mode="sample")`), times the scale factor;
then, from the same generator, the start noise (`Pipeline.denoise`), and the sampler run from
step `steps - int(steps * strength)` (`samplers.sample`). Opening files, EXIF orientation and
mode conversion are `images.imagefile`'s; this module takes RGB images.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from sdq.core.init_image import check_strength

from .configs import LATENT_SCALE


@dataclass(frozen=True)
class Init:
    """One item's img2img start: its init image (RGB, any size: resized to the item's) and the
    strength, which its batch shares since it decides where the schedule starts."""

    image: Image.Image
    strength: float

    def __post_init__(self) -> None:
        if self.image.mode != "RGB":
            raise ValueError(f"init images must be RGB (images.imagefile converts them), "
                             f"got mode {self.image.mode}")
        object.__setattr__(self, "strength", check_strength(self.strength))


def to_pixels(image: Image.Image, width: int, height: int) -> Tensor:
    """An RGB image as a (1, 3, height, width) float32 tensor in [-1, 1], resized with LANCZOS
    as `VaeImageProcessor.resize` does (PIL keeps an image already at that size as it is)."""
    if image.mode != "RGB":
        raise ValueError(f"expected an RGB image, got mode {image.mode}")
    resized = image.resize((width, height), resample=Image.Resampling.LANCZOS)
    array = np.array(resized).astype(np.float32) / 255.0
    return 2.0 * torch.from_numpy(array.transpose(2, 0, 1))[None] - 1.0


def posterior_sample(mean: Tensor, logvar: Tensor, generators: Sequence[torch.Generator]) -> Tensor:
    """Scaled latents drawn from the autoencoder's posterior, one draw per image from its own CPU
    generator (float32, as the start noise), in diffusers' order: mean + std * ε, then the
    scale factor."""
    draws = torch.cat([torch.randn((1, *mean.shape[1:]), generator=g, dtype=torch.float32)
                       for g in generators]).to(mean.device)
    std = torch.exp(0.5 * logvar.float())
    return LATENT_SCALE * (mean.float() + std * draws)
