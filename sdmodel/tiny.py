"""Random-weight models of the real architectures, for the tests and the benchmarks.

The test suite, the benchmarks and the GPU probe build their models here, so that the probe
runs on a machine holding only the model stack's packages (torch, transformers,
safetensors, numpy, Pillow): nothing here imports pytest or a test service. The tiny models have
the real architectures (4 UNet levels, 2 res blocks, attention at the first three, 8 heads,
GEGLU, f=8 autoencoder, CLIP text transformer with the real 49 408-token vocabulary) at a few
percent of the width.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from .modelfiles import PREFIXES
from .configs import UNetConfig, VAEConfig
from .unet import UNetModel
from .vae import AutoencoderKL

TINY_UNET = UNetConfig(model_channels=32, context_dim=64)
TINY_VAE = VAEConfig(ch=32)
TINY_TEXT = dict(hidden_size=64, num_attention_heads=1, num_hidden_layers=2, intermediate_size=128,
                 vocab_size=49408, max_position_embeddings=77)
VIT_L14_TEXT = dict(hidden_size=768, num_attention_heads=12, num_hidden_layers=12, intermediate_size=3072,
                    vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu")


def schedule_buffers() -> dict[str, torch.Tensor]:
    """The DDPM buffers real LDM checkpoints carry beside the weights (ignored on load)."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    return {"betas": betas.float(), "alphas_cumprod": alphas_cumprod.float(),
            "sqrt_alphas_cumprod": alphas_cumprod.sqrt().float()}


def ldm_checkpoint(unet: torch.nn.Module, vae: torch.nn.Module, text: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The three networks as one CompVis/LDM-layout state dict, with the extra keys of real files."""
    sd = {}
    for name, module in (("unet", unet), ("vae", vae)):
        sd.update({PREFIXES[name] + k: v.contiguous() for k, v in module.state_dict().items()})
    text_prefix = PREFIXES["text_encoder"] + "text_model."
    sd.update({text_prefix + k.removeprefix("text_model."): v.contiguous()
               for k, v in text.state_dict().items() if not k.endswith("position_ids")})
    sd[PREFIXES["text_encoder"] + "text_model.embeddings.position_ids"] = torch.arange(77)[None]
    sd.update(schedule_buffers())
    return sd


def build_tiny_networks(seed: int = 0) -> tuple[UNetModel, AutoencoderKL, torch.nn.Module]:
    """Random tiny networks whose outputs depend on prompt, seed and steps.

    PyTorch's default init leaves the cross-attention's contribution small and CLIP's token
    embeddings tiny (std 0.02), which makes every prompt give the same image; the token
    embeddings and the cross-attention output projections are scaled up so that differences in
    the inputs reach the pixels (tests assert they do).
    """
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNetModel(TINY_UNET)
    vae = AutoencoderKL(TINY_VAE)
    text = CLIPTextModel(CLIPTextConfig(**TINY_TEXT, hidden_act="quick_gelu"))
    with torch.no_grad():
        for name, module in unet.named_modules():
            if name.endswith("attn2.to_out.0"):
                module.weight.mul_(4.0)
        text.get_input_embeddings().weight.normal_(0, 1.0)
    return unet.eval(), vae.eval(), text.eval()


def random_fp16(module: torch.nn.Module, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Materialise a meta-device module's state dict as small random fp16 tensors."""
    return {k: torch.empty(v.shape, dtype=torch.float16).normal_(0, 0.02, generator=generator)
            for k, v in module.state_dict().items()}


def full_size_networks_fp16(seed: int) -> tuple[UNetModel, AutoencoderKL, torch.nn.Module]:
    """SD v1.5's three networks at full size with small random fp16 weights, built on the meta
    device so that 1.07 B parameters cost seconds and 2 GB rather than minutes and 4 GB."""
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        unet, vae = UNetModel(UNetConfig()), AutoencoderKL(VAEConfig())
        text = CLIPTextModel(CLIPTextConfig(**VIT_L14_TEXT))
    generator = torch.Generator().manual_seed(seed)
    for module in (unet, vae, text):
        module.load_state_dict(random_fp16(module, generator), assign=True, strict=False)
    return unet, vae, text


def stand_in_checkpoint(path: Path, marker: float = 0.0) -> Path:
    """A file that passes sdq's cheap model check (a safetensors header naming the three
    networks) but holds no usable weights: for what only hashes or records a model, and for
    failures at load time. `marker` makes files of different content."""
    save_file({prefix + "w": torch.full((1,), marker) for prefix in PREFIXES.values()}, str(path))
    return path


def photo(width: int, height: int, seed: int = 0, grain: int = 10) -> Image.Image:
    """A stand-in for decoder output: smooth colour fields plus fine grain (up to `grain`
    levels either way), as photos have."""
    rng = np.random.default_rng(seed)
    field = rng.normal(size=(height // 16 + 2, width // 16 + 2, 3))
    field = ((field - field.min()) / np.ptp(field) * 255).astype(np.uint8)
    smooth = np.asarray(Image.fromarray(field).resize((width, height), Image.BICUBIC), dtype=int)
    noise = rng.integers(-grain, grain + 1, size=smooth.shape)
    return Image.fromarray(np.clip(smooth + noise, 0, 255).astype(np.uint8))


# -- safety checkers: diffusers' `safety_checker/` layout, random weights, chosen thresholds --

TINY_CHECKERS = {
    # ViT-L/14's layout (patch 14 at 224 pixels, quick_gelu) at a tiny width.
    "vit-l14-scaled": (dict(hidden_size=64, num_attention_heads=2, num_hidden_layers=2,
                            intermediate_size=128, patch_size=14, image_size=224,
                            hidden_act="quick_gelu"), 48),
    "other-config": (dict(hidden_size=48, num_attention_heads=3, num_hidden_layers=1,
                          intermediate_size=96, patch_size=16, image_size=160, hidden_act="gelu",
                          layer_norm_eps=1e-6), 32),
}
"""(vision tower config, projection width) of tiny checkers that differ in every field the
loader reads."""
VIT_L14 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
               patch_size=14, image_size=224, hidden_act="quick_gelu")
"""The real checker's image tower (CompVis/stable-diffusion-safety-checker), projected to 768."""
VIT_L14_PROJECTION = 768
NEVER = 2.0
"""A threshold no cosine similarity reaches: the concept never flags."""


def save_safety_checker(folder: Path, vision: dict, projection_dim: int, *, concepts: int = 17,
                        special: int = 3, dtype: torch.dtype = torch.float32, seed: int = 0,
                        meta: bool = False) -> Path:
    """A `safety_checker/` folder (config.json, model.safetensors) with random weights in the
    layout diffusers saves; every threshold is NEVER, so nothing flags until changed.

    The tower gets transformers' own initialisation, under which different images embed
    differently enough to single one out (tests' `flag_images`); with `meta`, small random
    values instead, built on the meta device: seconds for the full-size tower, for timing only."""
    from transformers import CLIPConfig, CLIPVisionConfig, CLIPVisionModel

    config = CLIPConfig(vision_config=vision, projection_dim=projection_dim).to_dict()
    config["architectures"] = ["StableDiffusionSafetyChecker"]
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    generator = torch.Generator().manual_seed(seed)
    if meta:
        with torch.device("meta"):
            tower = CLIPVisionModel(CLIPVisionConfig(**vision))
        state = random_fp16(tower, generator)
    else:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            state = CLIPVisionModel(CLIPVisionConfig(**vision)).state_dict()
    weights = {f"vision_model.{k}": v for k, v in state.items() if not k.endswith("position_ids")}
    weights.update({
        "visual_projection.weight": torch.randn(projection_dim, vision["hidden_size"], generator=generator),
        "concept_embeds": torch.randn(concepts, projection_dim, generator=generator),
        "special_care_embeds": torch.randn(special, projection_dim, generator=generator),
        "concept_embeds_weights": torch.full((concepts,), NEVER),
        "special_care_embeds_weights": torch.full((special,), NEVER),
    })
    save_file({k: v.to(dtype) for k, v in weights.items()}, str(folder / "model.safetensors"))
    return folder
