"""Session-wide test settings and the tiny random-weight models every layer of sdq tests with.

Nothing in the suite may reach a model hub. The tiny models have the real architectures
(4 UNet levels, 2 res blocks, attention at the first three, 8 heads, GEGLU, f=8 autoencoder,
CLIP text transformer with the real 49 408-token vocabulary) at a few percent of the width.
"""
from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from sdq.sdmodel.checkpoint import PREFIXES  # noqa: E402
from sdq.sdmodel.configs import UNetConfig, VAEConfig  # noqa: E402
from sdq.sdmodel.unet import UNetModel  # noqa: E402
from sdq.sdmodel.vae import AutoencoderKL  # noqa: E402

pytest_plugins = ["tests.s3server"]

TINY_UNET = UNetConfig(model_channels=32, context_dim=64)
TINY_VAE = VAEConfig(ch=32)
TINY_TEXT = dict(hidden_size=64, num_attention_heads=1, num_hidden_layers=2, intermediate_size=128,
                 vocab_size=49408, max_position_embeddings=77)


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


VIT_L14_TEXT = dict(hidden_size=768, num_attention_heads=12, num_hidden_layers=12, intermediate_size=3072,
                    vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu")


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


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SD v1 model saved as a single-file `.safetensors` LDM checkpoint."""
    path = tmp_path_factory.mktemp("models") / "tiny-sd.safetensors"
    save_file(ldm_checkpoint(*build_tiny_networks()), str(path))
    return path
