"""Architecture descriptions of the networks, and their detection from weights or configs.

A diffusers folder's config.json is the truth for that folder: every key is either read into
the architecture or checked against what sdq's networks implement, so a folder that asks for
something else is refused by name instead of run as something it is not. Single-file
checkpoints carry no config; their architecture is read off the tensors' shapes, and what shapes
cannot tell (the number of attention heads) comes from the family conventions: SD v1 UNets use
8 heads, SD v2 UNets 64-channel heads (recognised by linear projections). Scaled-down random
test models take the same paths as real ones.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:
    from torch import Tensor

LATENT_SCALE = 0.18215
# The pipeline draws (4, H/8, W/8) latents: SD v1's autoencoder has 4 channels and 4 levels (f=8).
LATENT_CHANNELS = 4
VAE_LEVELS = 4

# Values that sdq's networks hard-wire, under diffusers' config keys. A key a config leaves out
# takes diffusers' default, which is the value listed here. Keys that do not change inference
# (sample_size, dropout, force_upcast, upcast_attention, which diffusers' SDPA attention ignores
# too) and keys unknown to sdq are not checked.
_UNET_FIXED: dict[str, Any] = {
    "in_channels": LATENT_CHANNELS, "out_channels": LATENT_CHANNELS,
    "act_fn": "silu", "norm_num_groups": 32, "norm_eps": 1e-5, "flip_sin_to_cos": True,
    "freq_shift": 0, "center_input_sample": False, "downsample_padding": 1,
    "mid_block_scale_factor": 1, "mid_block_type": "UNetMidBlock2DCrossAttn",
    "num_attention_heads": None, "dual_cross_attention": False, "class_embed_type": None,
    "num_class_embeds": None, "addition_embed_type": None, "encoder_hid_dim": None,
    "time_embedding_type": "positional", "time_embedding_dim": None, "time_embedding_act_fn": None,
    "timestep_post_act": None, "time_cond_proj_dim": None, "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0, "conv_in_kernel": 3,
    "conv_out_kernel": 3, "attention_type": "default", "cross_attention_norm": None,
    "class_embeddings_concat": False, "mid_block_only_cross_attention": None,
    "reverse_transformer_layers_per_block": None,
}
_VAE_FIXED: dict[str, Any] = {
    "in_channels": 3, "out_channels": 3, "latent_channels": LATENT_CHANNELS,
    "act_fn": "silu", "norm_num_groups": 32, "scaling_factor": LATENT_SCALE, "shift_factor": None,
    "latents_mean": None, "latents_std": None, "use_quant_conv": True, "use_post_quant_conv": True,
    "mid_block_add_attention": True,
}


@dataclass(frozen=True)
class UNetConfig:
    """The LDM `UNetModel` hyper-parameters that matter for inference (SD v1 defaults)."""

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_levels: tuple[int, ...] = (0, 1, 2)
    transformer_depth: int = 1
    context_dim: int = 768
    num_heads: int | None = 8
    head_channels: int | None = None
    linear_projection: bool = False

    def heads(self, channels: int) -> int:
        """Attention heads at a level: a fixed count (v1) or channels / head size (v2)."""
        return self.num_heads if self.num_heads is not None else channels // self.head_channels


@dataclass(frozen=True)
class VAEConfig:
    """The LDM `AutoencoderKL` hyper-parameters (SD v1 defaults: f=8, 4 latent channels)."""

    in_channels: int = 3
    out_channels: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    embed_dim: int = 4


def _indices(keys: Any, pattern: str) -> list[int]:
    found = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    return sorted(found)


def unet_config_from_state_dict(sd: Mapping[str, Tensor]) -> UNetConfig:
    """Infer an LDM UNet's architecture from its weights (keys without `model.diffusion_model.`)."""
    keys = list(sd)
    conv_in = sd["input_blocks.0.0.weight"]
    mc = conv_in.shape[0]
    mult: list[int] = []
    res_per_level: list[int] = []
    attention_levels: list[int] = []
    count = 0
    for i in _indices(keys, r"input_blocks\.(\d+)\.")[1:]:
        if f"input_blocks.{i}.0.op.weight" in sd:
            res_per_level.append(count)
            count = 0
            continue
        if count == 0:
            level = len(mult)
            mult.append(sd[f"input_blocks.{i}.0.out_layers.3.weight"].shape[0] // mc)
            if any(k.startswith(f"input_blocks.{i}.1.") for k in keys):
                attention_levels.append(level)
        count += 1
    res_per_level.append(count)
    if len(set(res_per_level)) != 1:
        raise ValueError(f"UNet levels have unequal numbers of res blocks: {res_per_level}")
    proj_in = sd["middle_block.1.proj_in.weight"]
    linear = proj_in.ndim == 2
    depth = len(_indices(keys, r"middle_block\.1\.transformer_blocks\.(\d+)\."))
    return UNetConfig(
        in_channels=conv_in.shape[1],
        out_channels=sd["out.2.weight"].shape[0],
        model_channels=mc,
        channel_mult=tuple(mult),
        num_res_blocks=res_per_level[0],
        attention_levels=tuple(attention_levels),
        transformer_depth=depth,
        context_dim=sd["middle_block.1.transformer_blocks.0.attn2.to_k.weight"].shape[1],
        num_heads=None if linear else 8,
        head_channels=64 if linear else None,
        linear_projection=linear,
    )


def vae_config_from_state_dict(sd: Mapping[str, Tensor]) -> VAEConfig:
    """Infer an LDM autoencoder's architecture from its weights (keys without `first_stage_model.`)."""
    keys = list(sd)
    ch = sd["encoder.conv_in.weight"].shape[0]
    levels = _indices(keys, r"encoder\.down\.(\d+)\.")
    return VAEConfig(
        in_channels=sd["encoder.conv_in.weight"].shape[1],
        out_channels=sd["decoder.conv_out.weight"].shape[0],
        ch=ch,
        ch_mult=tuple(sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // ch for i in levels),
        num_res_blocks=len(_indices(keys, r"encoder\.down\.0\.block\.(\d+)\.")),
        z_channels=sd["decoder.conv_in.weight"].shape[1],
        embed_dim=sd["post_quant_conv.weight"].shape[1],
    )


def _refuse(problems: list[str]) -> None:
    if problems:
        raise ValueError("; ".join(problems))


def _fixed_values(cfg: Mapping[str, Any], fixed: Mapping[str, Any], network: str) -> list[str]:
    return [
        f"{key} = {json.dumps(cfg[key])}: sdq's {network} implements {json.dumps(value)} only"
        for key, value in fixed.items() if key in cfg and cfg[key] != value
    ]


def _per_level(cfg: Mapping[str, Any], key: str, default: Any, levels: int) -> list[Any]:
    """A key diffusers accepts as one value or one per level."""
    value = cfg.get(key, default)
    return list(value) if isinstance(value, (list, tuple)) else [value] * levels


def _required(cfg: Mapping[str, Any], *keys: str) -> None:
    _refuse([f"{key} missing" for key in keys if key not in cfg])


def _width_problems(widths: list[int]) -> list[str]:
    """The LDM networks express level widths as multiples of the first (channel_mult)."""
    if widths and all(w % widths[0] == 0 for w in widths):
        return []
    return [f"block_out_channels = {json.dumps(widths)}: each width must be a multiple of the first"]


def unet_config_from_diffusers(cfg: Mapping[str, Any]) -> UNetConfig:
    """Read a diffusers `unet/config.json`; ValueError lists every key sdq cannot honour.

    diffusers' `attention_head_dim` is the head count for SD v1 (a historical misnomer, one
    value or one per level); with linear projections (SD v2) the head width is what stays
    constant across levels."""
    _required(cfg, "block_out_channels", "layers_per_block", "down_block_types", "cross_attention_dim")
    widths, down = list(cfg["block_out_channels"]), list(cfg["down_block_types"])
    levels, linear = len(widths), bool(cfg.get("use_linear_projection", False))
    problems = _fixed_values(cfg, _UNET_FIXED, "UNet") + _width_problems(widths)
    mirrored = ["CrossAttnUpBlock2D" if kind.startswith("CrossAttn") else "UpBlock2D" for kind in reversed(down)]
    if set(down) - {"CrossAttnDownBlock2D", "DownBlock2D"} or len(down) != levels:
        problems.append(f"down_block_types = {json.dumps(down)}: one CrossAttnDownBlock2D or "
                        f"DownBlock2D per entry of block_out_channels expected")
    elif list(cfg.get("up_block_types", mirrored)) != mirrored:
        problems.append(f"up_block_types = {json.dumps(cfg['up_block_types'])}: sdq's UNet mirrors "
                        f"down_block_types, {json.dumps(mirrored)}")
    attention_levels = tuple(i for i, kind in enumerate(down) if kind.startswith("CrossAttn"))
    heads = _per_level(cfg, "attention_head_dim", 8, levels)
    used = [(widths[i], heads[i]) for i in {*attention_levels, levels - 1} if i < min(levels, len(heads))]
    sizes = {(w // h if linear else h) if w % h == 0 else 0 for w, h in used}
    if len(sizes) != 1 or 0 in sizes:
        what = ("heads of one width at every attending level" if linear
                else "one head count that divides the width of every attending level")
        problems.append(f"attention_head_dim = {json.dumps(cfg.get('attention_head_dim'))}: sdq's UNet needs {what}")
    depths = set(_per_level(cfg, "transformer_layers_per_block", 1, levels))
    if len(depths) != 1:
        problems.append(f"transformer_layers_per_block = {json.dumps(cfg['transformer_layers_per_block'])}: "
                        "sdq's UNet uses one depth for every level")
    if any(_per_level(cfg, "only_cross_attention", False, levels)):
        problems.append("only_cross_attention: sdq's UNet has self-attention in every transformer block")
    _refuse(problems)
    (size,), (depth,) = sizes, depths
    return UNetConfig(
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        model_channels=widths[0],
        channel_mult=tuple(w // widths[0] for w in widths),
        num_res_blocks=cfg["layers_per_block"],
        attention_levels=attention_levels,
        transformer_depth=depth,
        context_dim=cfg["cross_attention_dim"],
        num_heads=None if linear else size,
        head_channels=size if linear else None,
        linear_projection=linear,
    )


def vae_config_from_diffusers(cfg: Mapping[str, Any]) -> VAEConfig:
    """Read a diffusers `vae/config.json`; ValueError lists every key sdq cannot honour."""
    _required(cfg, "block_out_channels", "layers_per_block")
    widths = list(cfg["block_out_channels"])
    problems = _fixed_values(cfg, _VAE_FIXED, "autoencoder") + _width_problems(widths)
    if len(widths) != VAE_LEVELS:
        problems.append(f"block_out_channels = {json.dumps(widths)}: sdq's pipeline needs {VAE_LEVELS} "
                        f"levels (latents 1/8 of the image size)")
    for key, kind in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        if key in cfg and list(cfg[key]) != [kind] * len(widths):
            problems.append(f"{key} = {json.dumps(cfg[key])}: {kind} per level expected")
    _refuse(problems)
    return VAEConfig(
        ch=widths[0],
        ch_mult=tuple(w // widths[0] for w in widths),
        num_res_blocks=cfg["layers_per_block"],
        z_channels=LATENT_CHANNELS,
        embed_dim=LATENT_CHANNELS,
    )
