"""diffusers as the reference: turn an sdq/LDM checkpoint into diffusers models with diffusers'
own single-file converters, so parity tests compare two independent implementations.

For the tests, the benchmarks and the GPU probe: diffusers (the `test` extra) is imported only
when a function here is called, and sdq itself never calls one."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sdq.sdmodel import clip
from sdq.sdmodel.configs import UNetConfig, VAEConfig

SD15_SCHEDULER = {
    "_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "beta_start": 0.00085, "num_train_timesteps": 1000, "set_alpha_to_one": False,
    "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None, "clip_sample": False,
}
SCHEDULERS = {
    "ddim": ("DDIMScheduler", {}),
    "plms": ("PNDMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
}


def reference_scheduler(sampler: str):
    """The diffusers scheduler of an sdq sampler, built from SD v1.5's own scheduler config."""
    import diffusers

    class_name, options = SCHEDULERS[sampler]
    return getattr(diffusers, class_name).from_config(SD15_SCHEDULER, **options)


def original_config(unet: UNetConfig, vae: VAEConfig) -> dict[str, Any]:
    """The LDM inference YAML (v1-inference.yaml) for these architectures, as a dict."""
    return {"model": {"params": {
        "scale_factor": 0.18215,
        "unet_config": {"params": {
            "image_size": 32, "in_channels": unet.in_channels, "out_channels": unet.out_channels,
            "model_channels": unet.model_channels,
            "attention_resolutions": [2**level for level in unet.attention_levels],
            "num_res_blocks": unet.num_res_blocks, "channel_mult": list(unet.channel_mult),
            "num_heads": unet.num_heads, "use_spatial_transformer": True,
            "transformer_depth": unet.transformer_depth, "context_dim": unet.context_dim,
            "use_checkpoint": True, "legacy": False,
        }},
        "first_stage_config": {"params": {"embed_dim": vae.embed_dim, "ddconfig": {
            "double_z": True, "z_channels": vae.z_channels, "resolution": 256,
            "in_channels": vae.in_channels, "out_ch": vae.out_channels, "ch": vae.ch,
            "ch_mult": list(vae.ch_mult), "num_res_blocks": vae.num_res_blocks,
            "attn_resolutions": [], "dropout": 0.0,
        }}},
        "cond_stage_config": {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder"},
    }}}


def to_diffusers(checkpoint: dict[str, torch.Tensor], unet: UNetConfig, vae: VAEConfig, text_config):
    """diffusers' UNet, VAE and CLIP models from an LDM-layout checkpoint; strict loading, so
    anything the converter leaves out or cannot place fails here."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders import single_file_utils as sfu
    from transformers import CLIPTextModel

    config = original_config(unet, vae)
    unet_cfg = sfu.create_unet_diffusers_config_from_ldm(config, checkpoint)
    vae_cfg = sfu.create_vae_diffusers_config_from_ldm(config, checkpoint)
    with torch.device("meta"):
        d_unet = UNet2DConditionModel(**unet_cfg)
        d_vae = AutoencoderKL(**vae_cfg)
        d_text = CLIPTextModel(text_config)
    d_unet.load_state_dict(sfu.convert_ldm_unet_checkpoint(checkpoint, unet_cfg), strict=True, assign=True)
    d_vae.load_state_dict(sfu.convert_ldm_vae_checkpoint(checkpoint, vae_cfg), strict=True, assign=True)
    text_sd = sfu.convert_ldm_clip_checkpoint(checkpoint)
    text_sd.pop("text_model.embeddings.position_ids", None)
    if not any(k.startswith("text_model.") for k in d_text.state_dict()):
        text_sd = {k.removeprefix("text_model."): v for k, v in text_sd.items()}
    missing, unexpected = d_text.load_state_dict(text_sd, strict=False, assign=True)
    assert not unexpected and set(missing) <= {"embeddings.position_ids"}, (missing, unexpected)
    d_text.embeddings.position_ids = torch.arange(text_config.max_position_embeddings)[None]
    return d_unet.eval(), d_vae.eval(), d_text.eval()


def reference_pipeline(checkpoint: Path, tokenizer=None, sampler: str = "plms", *,
                       img2img: bool = False):
    """diffusers' StableDiffusionPipeline (StableDiffusionImg2ImgPipeline with `img2img`) on a
    tiny sdq checkpoint (tiny.py's architecture),
    built afresh with its own copy of the text encoder, for tests that change it
    (`load_textual_inversion` changes it in place, and the tokenizer, so pass a copy of sdq's
    where that is called; `load_lora_weights` merges adapters into it)."""
    import diffusers
    from safetensors.torch import load_file
    from transformers import CLIPTextConfig

    from .tiny import TINY_TEXT, TINY_UNET, TINY_VAE

    unet, vae, text = to_diffusers(load_file(str(checkpoint)), TINY_UNET, TINY_VAE,
                                   CLIPTextConfig(**TINY_TEXT, hidden_act="quick_gelu"))
    kind = diffusers.StableDiffusionImg2ImgPipeline if img2img else diffusers.StableDiffusionPipeline
    ref = kind(
        vae=vae, text_encoder=text, tokenizer=tokenizer or clip.load_tokenizer(), unet=unet,
        scheduler=reference_scheduler(sampler), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    ref.set_progress_bar_config(disable=True)
    return ref
