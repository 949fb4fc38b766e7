"""Architecture descriptions of the networks, and their detection from weights or configs.

The architecture is read off the tensors' shapes (single-file checkpoints) or the diffusers
config.json (folders), so a scaled-down random test model takes the same path as a real
checkpoint. Shapes cannot tell the number of attention heads; the family conventions fill it in:
SD v1 UNets use 8 heads, SD v2 UNets 64-channel heads (recognised by linear projections).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping

from torch import Tensor

LATENT_SCALE = 0.18215


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


def unet_config_from_diffusers(cfg: Mapping[str, Any]) -> UNetConfig:
    """Read a diffusers `unet/config.json` (whose `attention_head_dim` is the v1 head count)."""
    widths = cfg["block_out_channels"]
    heads = cfg.get("attention_head_dim", 8)
    linear = bool(cfg.get("use_linear_projection", False))
    if isinstance(heads, list):
        heads = widths[0] // heads[0] if linear else heads[0]
    return UNetConfig(
        in_channels=cfg["in_channels"],
        out_channels=cfg["out_channels"],
        model_channels=widths[0],
        channel_mult=tuple(w // widths[0] for w in widths),
        num_res_blocks=cfg["layers_per_block"],
        attention_levels=tuple(
            i for i, kind in enumerate(cfg["down_block_types"]) if kind.startswith("CrossAttn")
        ),
        transformer_depth=cfg.get("transformer_layers_per_block", 1),
        context_dim=cfg["cross_attention_dim"],
        num_heads=None if linear else heads,
        head_channels=heads if linear else None,
        linear_projection=linear,
    )


def vae_config_from_diffusers(cfg: Mapping[str, Any]) -> VAEConfig:
    """Read a diffusers `vae/config.json`."""
    widths = cfg["block_out_channels"]
    return VAEConfig(
        in_channels=cfg["in_channels"],
        out_channels=cfg["out_channels"],
        ch=widths[0],
        ch_mult=tuple(w // widths[0] for w in widths),
        num_res_blocks=cfg["layers_per_block"],
        z_channels=cfg["latent_channels"],
        embed_dim=cfg["latent_channels"],
    )
