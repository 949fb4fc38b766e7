"""Reading model weights: single-file LDM checkpoints and diffusers-format folders, offline.

Our modules' attribute paths are the LDM checkpoint's key names, so a single file loads by
name; a diffusers folder is renamed into that layout first (`diffusers_unet_to_ldm`,
`diffusers_vae_to_ldm`). Missing, unexpected or mis-shaped weights are an error naming them:
a silently half-loaded model makes plausible-looking noise, which is worse than a clear failure.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from .modelfiles import PREFIXES, CheckpointError

# The names under which released SD .ckpt files pickle harmless training state.
_INERT_GLOBALS = (
    "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
    "lightning.pytorch.callbacks.model_checkpoint.ModelCheckpoint",
)

# Keys that real checkpoints carry but inference does not use: EMA copies, the DDPM schedule
# (we compute it), the loss's log-variance, and CLIP's position-id buffer.
_IGNORED = re.compile(
    r"^model_ema\.|(^|\.)logvar$|\.position_ids$|^(betas|alphas_cumprod|alphas_cumprod_prev"
    r"|sqrt_alphas_cumprod|sqrt_one_minus_alphas_cumprod|log_one_minus_alphas_cumprod"
    r"|sqrt_recip_alphas_cumprod|sqrt_recipm1_alphas_cumprod|posterior_variance"
    r"|posterior_log_variance_clipped|posterior_mean_coef1|posterior_mean_coef2)$"
)


class _InertStandIn:
    """Receives the pickled state of a known training callback and does nothing with it."""

    def __setstate__(self, state: Any) -> None:
        self.state = state


def _listing(names: Iterable[str], limit: int = 8) -> str:
    names = sorted(names)
    shown = ", ".join(names[:limit])
    return shown + (f" (and {len(names) - limit} more)" if len(names) > limit else "")


def unpickle(file: Path | BinaryIO, source: Path) -> Any:
    """A pickled file's objects through `torch.load(weights_only=True)` only: tensors, plain
    containers, and the training callbacks of `_INERT_GLOBALS` as inert stand-ins. Anything
    else (code) is refused as a CheckpointError naming what the file references."""
    stand_ins = [(_InertStandIn, name) for name in _INERT_GLOBALS]
    try:
        with torch.serialization.safe_globals(stand_ins):
            return torch.load(file, map_location="cpu", weights_only=True, mmap=isinstance(file, Path))
    except Exception as exc:  # the unpickler's refusal names the global it would not run
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        reason = (
            f"it references {found.group(1)}, which is neither a tensor nor a known harmless "
            "training object; convert the file to .safetensors with a tool you trust"
            if found else str(exc).strip().splitlines()[-1]
        )
        raise CheckpointError(source, f"refused to unpickle: {reason}") from None


def read_weights(path: Path) -> dict[str, Tensor]:
    """Load a `.safetensors` file, or a `.ckpt`/`.bin` through the restricted unpickler only."""
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except SafetensorError as exc:  # truncated or not a safetensors file at all
            raise CheckpointError(path, f"unreadable .safetensors file: {exc}") from None
    obj = unpickle(path, path)
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise CheckpointError(path, f"expected a dict of tensors, found {type(obj).__name__}")
    return {k: v for k, v in obj.items() if isinstance(v, Tensor)}


def split_ldm(sd: Mapping[str, Tensor], source: Path) -> dict[str, dict[str, Tensor]]:
    """Split a single-file checkpoint into its three networks' state dicts (prefixes removed)."""
    parts: dict[str, dict[str, Tensor]] = {name: {} for name in PREFIXES}
    stray = []
    for key, value in sd.items():
        for name, prefix in PREFIXES.items():
            if key.startswith(prefix):
                parts[name][key[len(prefix):]] = value
                break
        else:
            if not _IGNORED.search(key):
                stray.append(key)
    if stray:
        raise CheckpointError(source, f"unexpected weights: {_listing(stray)}")
    empty = [PREFIXES[name] + "*" for name, part in parts.items() if not part]
    if empty:
        raise CheckpointError(source, f"not an SD v1 checkpoint: no weights under {', '.join(empty)}")
    parts["text_encoder"] = {k: v for k, v in parts["text_encoder"].items() if not _IGNORED.search(k)}
    return parts


def load_weights(module: nn.Module, sd: Mapping[str, Tensor], source: Path | str, prefix: str = "") -> None:
    """Assign `sd` to a (meta-device) module; every weight must be there with its exact shape."""
    expected = module.state_dict()
    missing = expected.keys() - sd.keys()
    unexpected = sd.keys() - expected.keys()
    problems = []
    if missing:
        problems.append(f"missing weights: {_listing(prefix + k for k in missing)}")
    if unexpected:
        problems.append(f"unexpected weights: {_listing(prefix + k for k in unexpected)}")
    wrong = [
        f"{prefix}{k} has shape {tuple(sd[k].shape)}, expected {tuple(expected[k].shape)}"
        for k in expected  # the module's order: the same message every run
        if k in sd and sd[k].shape != expected[k].shape
    ]
    if wrong:
        problems.append("; ".join(wrong[:8]))
    if problems:
        raise CheckpointError(source, "; ".join(problems))
    module.load_state_dict(dict(sd), assign=True)


_RESNET = {
    "norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection",
}
_UNET_FIXED = {
    "conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2", "conv_norm_out": "out.0", "conv_out": "out.2",
}


def diffusers_unet_to_ldm(sd: Mapping[str, Tensor], layers_per_block: int) -> dict[str, Tensor]:
    """Rename a diffusers `UNet2DConditionModel` state dict into the LDM layout."""
    n = layers_per_block + 1
    attention_up = {int(k.split(".")[1]) for k in sd if re.match(r"up_blocks\.\d+\.attentions\.", k)}

    def rename(key: str) -> str:
        stem, leaf = key.rsplit(".", 1)
        if stem in _UNET_FIXED:
            return f"{_UNET_FIXED[stem]}.{leaf}"
        m = re.match(r"(down_blocks|up_blocks|mid_block)\.(?:(\d+)\.)?(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)$", key)
        if m is None:
            raise CheckpointError("unet", f"unknown diffusers UNet weight {key}")
        where, i, kind, j, rest = m.group(1), int(m.group(2) or 0), m.group(3), int(m.group(4)), m.group(5)
        if kind == "resnets":
            head, _, tail = rest.partition(".")
            rest = f"{_RESNET[head]}.{tail}"
        if where == "mid_block":
            return f"middle_block.{2 * j if kind == 'resnets' else 1}.{rest}"
        if kind == "downsamplers":
            return f"input_blocks.{(i + 1) * n}.0.op.{rest.removeprefix('conv.')}"
        if kind == "upsamplers":
            return f"output_blocks.{i * n + n - 1}.{2 if i in attention_up else 1}.{rest}"
        block = 1 + i * n + j if where == "down_blocks" else i * n + j
        group = "input_blocks" if where == "down_blocks" else "output_blocks"
        return f"{group}.{block}.{0 if kind == 'resnets' else 1}.{rest}"

    return {rename(k): v for k, v in sd.items()}


def diffusers_vae_to_ldm(sd: Mapping[str, Tensor], levels: int) -> dict[str, Tensor]:
    """Rename a diffusers `AutoencoderKL` state dict into the LDM layout (linear attention
    projections become the checkpoint's 1x1 convs)."""
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        k = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        k = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", k)
        k = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", k)
        k = re.sub(
            r"^decoder\.up_blocks\.(\d+)\.(resnets|upsamplers\.0)\.",
            lambda m: f"decoder.up.{levels - 1 - int(m.group(1))}."
            + ("block." if m.group(2) == "resnets" else "upsample."),
            k,
        )
        k = re.sub(r"\.mid_block\.resnets\.(\d)\.", lambda m: f".mid.block_{int(m.group(1)) + 1}.", k)
        m = re.match(r"^(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)$", k)
        if m:
            k = f"{m.group(1)}.mid.attn_1.{attn[m.group(2)]}.{m.group(3)}"
            if value.ndim == 2:
                value = value[:, :, None, None]
        out[k] = value
    return out
