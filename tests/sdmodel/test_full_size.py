"""The real SD v1.5 layout at full size: random fp16 weights in the exact key layout of released
single-file checkpoints, accepted both by diffusers' own converter and by sdq."""
from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from sdq.sdmodel.configs import UNetConfig, VAEConfig
from sdq.sdmodel.diffusers_reference import to_diffusers
from sdq.sdmodel.pipeline import Request, load_pipeline

from ..conftest import VIT_L14_TEXT, full_size_networks_fp16, ldm_checkpoint


@pytest.mark.slow
def test_full_size_checkpoint_is_the_real_layout(tmp_path):
    free = shutil.disk_usage(tmp_path).free
    assert free >= 8 * 2**30, f"{tmp_path}: needs 8 GiB free for a 2.1 GB checkpoint, has {free / 2**30:.1f}"
    from transformers import CLIPTextConfig

    checkpoint = ldm_checkpoint(*full_size_networks_fp16(seed=0))
    assert sum(v.numel() for k, v in checkpoint.items() if k.startswith("model.diffusion_model.")) == 859_520_964
    path = tmp_path / "sd-v1-5-random.safetensors"
    save_file(checkpoint, str(path))
    del checkpoint

    # diffusers' converter turns the file into complete models, loaded strictly.
    d_unet, _, _ = to_diffusers(load_file(str(path)), UNetConfig(), VAEConfig(), CLIPTextConfig(**VIT_L14_TEXT))

    pipe = load_pipeline(path, device="cpu", dtype="fp32")
    assert pipe.unet.config == UNetConfig() and pipe.vae.config == VAEConfig()
    assert pipe.text_encoder.config.num_attention_heads == 12
    assert pipe.text_encoder.config.hidden_size == 768

    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, 8, 8, generator=g)
    context = torch.randn(1, 77, 768, generator=g)
    t = torch.tensor(500.0)
    with torch.inference_mode():
        ours = pipe.unet(x, t, context)
        theirs = d_unet.float()(x, t, context).sample
    assert (ours - theirs).abs().max().item() < 1e-4 * max(1.0, theirs.abs().max().item())
    image = pipe.generate([Request("a photograph of an astronaut riding a horse", seed=1)],
                          steps=1, width=64, height=64)[0]
    assert image.size == (64, 64)
