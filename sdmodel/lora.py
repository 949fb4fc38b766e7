"""LoRA adapters merged into the model's weights: read once, merged once per group of requests
that share them, and taken out again bit for bit.

A LoRA changes a layer's weight by a low-rank product; merged, it costs nothing per image:

    W' = W + sum over LoRAs of  weight * (up @ down) * alpha / rank

(`alpha` = rank when the file has none; `down` of a convolution has the layer's kernel and `up`
is 1x1, so `up @ down` over the flattened kernel is the composed convolution's weight). The sum
is taken in float32 and cast once to the weights' dtype.

Formats read (keys in `.safetensors`, or `.pt`/`.ckpt` through the restricted unpickler):
- kohya-ss / A1111: `lora_unet_<module>.lora_down.weight`, `.lora_up.weight`, `.alpha`, with
  the UNet module in diffusers spelling (`down_blocks_0_attentions_0_..._attn1_to_q`) or LDM
  spelling (`input_blocks_1_1_..._attn1_to_q`); text encoder `lora_te_` / `lora_te1_` +
  transformers' names (`text_model_encoder_layers_0_self_attn_q_proj`);
- diffusers / PEFT: `unet.<diffusers module>.lora_A.weight` / `.lora_B.weight` and
  `text_encoder.<module>...`, alpha from an `.alpha` (or `.network_alpha`) tensor, else from the
  `lora_adapter_metadata` diffusers writes (`lora_alpha`, `alpha_pattern`, `use_rslora`).
Linear layers and convolutions (1x1, and 3x3 "LoCon" pairs). Other LyCORIS kinds (LoHa, LoKr,
DoRA, ...) are refused by name, as is any key that names no layer of this model or does not fit
its shape: a silently half-applied adapter makes a plausible but wrong image.
"""
from __future__ import annotations

import json
import math
import re
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import NamedTuple, TypeVar

import torch
from torch import Tensor, nn

from sdq.core.errors import InvalidInput

from .checkpoint import read_weights
from .lora_files import describe_lora, find_lora, safetensors_metadata
from .unet import Downsample, ResBlock, SpatialTransformer, UNetModel, Upsample

T = TypeVar("T")
NETWORKS = ("unet", "text_encoder")
DEFAULT_CACHE_FILES = 8
"""LoRA files kept loaded (least recently used dropped first): enough for the sets of a
typical job, few enough that memory stays bounded (files are 10-300 MB)."""


class Lora(NamedTuple):
    """One adapter of a request: its file name, multiplier, and the sha256 the job recorded
    (None: not checked)."""

    name: str
    weight: float = 1.0
    sha256: str | None = None


LoraSet = tuple[Lora, ...]


def canonical(loras: Iterable[tuple[str, float, str | None]]) -> LoraSet:
    """One spelling per set, sorted: the merged weights (a float sum) and the group a request
    falls in do not depend on the order its LoRAs were written in."""
    return tuple(sorted((Lora(str(n), float(w), s) for n, w, s in loras),
                        key=lambda lora: (lora.name, lora.weight, lora.sha256 or "")))


def group_by_loras(
    items: Iterable[T], loras: Callable[[T], Iterable[tuple[str, float, str | None]]], *,
    first: Iterable[tuple[str, float, str | None]] | None = None,
) -> list[tuple[LoraSet, list[T]]]:
    """The items gathered by LoRA set, so a worker merges once per group, never per image.

    Groups come in the order their set first appears, items in their own order; the group of
    `first` (pass the set merged now, `Adapters.current`) comes first, sparing a merge."""
    groups: dict[LoraSet, list[T]] = {}
    for item in items:
        groups.setdefault(canonical(loras(item)), []).append(item)
    lead = None if first is None else canonical(first)
    return [(s, groups[s]) for s in sorted(groups, key=lambda s: s != lead)]


# -- the layers a LoRA may address ------------------------------------------------------

_TOP = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
        "input_blocks.0.0": "conv_in", "out.2": "conv_out"}
_KINDS = {ResBlock: "resnets", SpatialTransformer: "attentions", Downsample: "downsamplers",
          Upsample: "upsamplers"}
_RESNET = {"in_layers.2": "conv1", "emb_layers.1": "time_emb_proj", "out_layers.3": "conv2",
           "skip_connection": "conv_shortcut"}
_MIDDLE = ["mid_block.resnets.0", "mid_block.attentions.0", "mid_block.resnets.1"]


def _weighted(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, nn.Conv2d))


def diffusers_names(unet: UNetModel) -> dict[str, str]:
    """Each UNet linear/conv layer's path (the LDM name sdq uses) -> its diffusers name, read
    off the blocks' own layers, so it holds for any depth and attention layout."""
    n = unet.config.num_res_blocks + 1
    layers: list[tuple[str, str, nn.Module]] = []
    for b, block in list(enumerate(unet.input_blocks))[1:]:
        level, j = divmod(b - 1, n)
        for k, layer in enumerate(block):
            index = 0 if isinstance(layer, Downsample) else j
            layers.append((f"input_blocks.{b}.{k}", f"down_blocks.{level}.{_KINDS[type(layer)]}.{index}", layer))
    layers += [(f"middle_block.{k}", _MIDDLE[k], layer) for k, layer in enumerate(unet.middle_block)]
    for b, block in enumerate(unet.output_blocks):
        level, j = divmod(b, n)
        for k, layer in enumerate(block):
            index = 0 if isinstance(layer, Upsample) else j
            layers.append((f"output_blocks.{b}.{k}", f"up_blocks.{level}.{_KINDS[type(layer)]}.{index}", layer))
    names = dict(_TOP)
    for ldm, diffusers, layer in layers:
        for inner, module in layer.named_modules():
            if _weighted(module):
                own = _RESNET[inner] if isinstance(layer, ResBlock) else "conv" if inner == "op" else inner
                names[f"{ldm}.{inner}"] = f"{diffusers}.{own}"
    return names


def _spellings(paths: Mapping[str, Iterable[str]]) -> dict[str, str]:
    """Every accepted spelling of a layer (dotted, and kohya's with `_` for `.`) -> its path."""
    table: dict[str, str] = {}
    for path, names in paths.items():
        for name in (path, *names):
            for spelling in (name, name.replace(".", "_")):
                if table.setdefault(spelling, path) != path:
                    raise ValueError(f"{spelling} would name both {table[spelling]} and {path}")
    return table


def layer_tables(unet: UNetModel, text_encoder: nn.Module) -> dict[str, dict[str, str]]:
    """Per network, each spelling a LoRA file may use for a layer -> the layer's path in sdq."""
    # Files name CLIP's layers from `text_model.`; transformers 5's CLIPTextModel has no such level.
    text = {name: () if name.startswith("text_model.") else (f"text_model.{name}",)
            for name, module in text_encoder.named_modules() if _weighted(module)}
    return {"unet": _spellings({path: (d,) for path, d in diffusers_names(unet).items()}),
            "text_encoder": _spellings(text)}


# -- reading a file ---------------------------------------------------------------------

_KOHYA_PARTS = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}
_KOHYA_NETWORKS = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder"}
_PEFT_PARTS = {"lora_A.weight": "down", "lora_B.weight": "up", "alpha": "alpha", "network_alpha": "alpha"}
_PEFT_KEY = re.compile(r"^(unet|text_encoder)\.(.+?)\.(%s)$" % "|".join(map(re.escape, _PEFT_PARTS)))


@dataclass(frozen=True)
class Update:
    """One layer's low-rank update from one file: delta = scale * up @ down."""

    network: str
    path: str
    down: Tensor
    up: Tensor
    scale: float


def _low_rank(parts: Sequence[tuple[Update, float]], device: torch.device) -> tuple[Tensor, Tensor, float]:
    """(up, down, factor) in float32, factor * up @ down being a layer's whole delta, the sum
    over its LoRAs of multiplier * scale * up @ down: several LoRAs side by side along the rank,
    so merging is one matrix product whatever their number."""
    def flat(t: Tensor) -> Tensor:
        return t.to(device, torch.float32).reshape(t.shape[0], -1)

    if len(parts) == 1:
        update, multiplier = parts[0]
        return flat(update.up), flat(update.down), multiplier * update.scale
    return (torch.cat([flat(u.up) * (m * u.scale) for u, m in parts], dim=1),
            torch.cat([flat(u.down) for u, _ in parts]), 1.0)


@dataclass(frozen=True)
class LoadedLora:
    """A file's updates, checked against this model, with the file's identity."""

    path: Path
    stat: tuple[int, int]
    sha256: str
    updates: tuple[Update, ...]

    @property
    def nbytes(self) -> int:
        return sum(u.down.nbytes + u.up.nbytes for u in self.updates)


def _split(path: Path, key: str) -> tuple[str, str, str]:
    """(network, layer spelling, part) of one key, or a one-line reason it is none."""
    for prefix, network in _KOHYA_NETWORKS.items():
        if key.startswith(prefix):
            stem, _, part = key.partition(".")
            if part not in _KOHYA_PARTS:
                raise InvalidInput(f"{path}: {key}: {part!r} is not a LoRA weight sdq reads "
                                   "(LoHa, LoKr, DoRA and other LyCORIS kinds are not supported)")
            return network, stem[len(prefix):], _KOHYA_PARTS[part]
    if key.startswith("lora_te2_"):
        raise InvalidInput(f"{path}: {key}: a second text encoder's weight (an SDXL LoRA?); "
                           "this model has one text encoder")
    found = _PEFT_KEY.match(key)
    if found is None:
        raise InvalidInput(f"{path}: {key}: not a LoRA key sdq reads (kohya-ss lora_unet_*/lora_te_*, "
                           "or diffusers unet.*/text_encoder.* with lora_A/lora_B)")
    return found.group(1), found.group(2), _PEFT_PARTS[found.group(3)]


def _peft_configs(path: Path, metadata: Mapping[str, str]) -> dict[str, dict]:
    """Per network, the LoraConfig fields diffusers writes into `lora_adapter_metadata`
    (`unet.lora_alpha`, `unet.alpha_pattern`, ...); empty when the file has none."""
    try:
        config = json.loads(metadata.get("lora_adapter_metadata", "{}"))
    except ValueError:
        raise InvalidInput(f"{path}: lora_adapter_metadata is not JSON") from None
    configs: dict[str, dict] = {network: {} for network in NETWORKS}
    for key, value in config.items() if isinstance(config, dict) else ():
        network, _, field = key.partition(".")
        if network in configs:
            configs[network][field] = value
    for network, own in configs.items():
        if own.get("use_dora"):
            raise InvalidInput(f"{path}: {network}: DoRA adapters are not supported")
    return configs


def _peft_alpha(config: Mapping, spelling: str) -> tuple[float | None, bool]:
    """(alpha, rsLoRA?) a PEFT config gives a layer: its `alpha_pattern` entry (matched on
    whole trailing names, as PEFT does), else `lora_alpha`; None when it says nothing."""
    pattern = config.get("alpha_pattern") or {}
    matched = [v for k, v in pattern.items() if spelling == k or spelling.endswith("." + k)]
    alpha = matched[0] if matched else config.get("lora_alpha")
    return (None if alpha is None else float(alpha)), bool(config.get("use_rslora"))


def _check_finite(path: Path, key: str, tensor: Tensor) -> None:
    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
        raise InvalidInput(f"{path}: {key}: holds NaN or infinite values")


def _fits(down: Tensor, up: Tensor, shape: Sequence[int]) -> bool:
    """Does up @ down make a weight of `shape` (linear, or conv with down carrying the kernel)?"""
    if down.ndim not in (2, 4) or up.ndim not in (2, 4) or math.prod(up.shape[2:]) != 1:
        return False
    if down.shape[0] < 1 or up.shape[1] != down.shape[0] or up.shape[0] != shape[0]:
        return False
    pointwise = math.prod(shape[2:]) == 1 and math.prod(down.shape[2:]) == 1
    return tuple(down.shape[1:]) == tuple(shape[1:]) or (pointwise and down.shape[1] == shape[1])


def weight_shape(module: nn.Module) -> torch.Size:
    """A layer's logical weight shape (also while a CPU conv holds its weight re-laid out)."""
    if isinstance(module, nn.Conv2d):
        return torch.Size((module.out_channels, module.in_channels // module.groups, *module.kernel_size))
    return torch.Size((module.out_features, module.in_features))


def read_lora(path: Path, networks: Mapping[str, nn.Module], tables: Mapping[str, Mapping[str, str]]) -> LoadedLora:
    """A LoRA file's updates, each checked to name a layer of `networks` and fit its shape."""
    before = path.stat()
    identity = describe_lora(path)
    tensors = read_weights(path)
    configs = _peft_configs(path, safetensors_metadata(path) if path.suffix.lower() == ".safetensors" else {})
    after = path.stat()
    if (before.st_size, before.st_mtime_ns) != (after.st_size, after.st_mtime_ns):
        raise InvalidInput(f"{path}: changed while being read")
    parts: dict[tuple[str, str], dict[str, tuple[str, Tensor]]] = {}
    for key, tensor in tensors.items():
        network, spelling, part = _split(path, key)
        _check_finite(path, key, tensor)
        parts.setdefault((network, spelling), {})[part] = (key, tensor)
    updates = []
    for (network, spelling), found in parts.items():
        key = next(iter(found.values()))[0]
        if "down" not in found or "up" not in found:
            missing = "down" if "down" not in found else "up"
            raise InvalidInput(f"{path}: {key}: its {missing} weight is missing")
        layer = tables[network].get(spelling)
        if layer is None:
            raise InvalidInput(f"{path}: {key}: names no layer of this model's {network}")
        (down_key, down), (_, up) = found["down"], found["up"]
        shape = weight_shape(networks[network].get_submodule(layer))
        if not _fits(down, up, shape):
            raise InvalidInput(f"{path}: {down_key}: down {tuple(down.shape)} and up {tuple(up.shape)} do not "
                               f"fit {network} layer {layer}, weight {tuple(shape)} (a LoRA for another model?)")
        rank = down.shape[0]
        peft = not key.startswith("lora_")
        alpha, rs = _peft_alpha(configs[network], spelling) if peft else (None, False)
        if "alpha" in found:
            alpha_key, value = found["alpha"]
            if value.numel() != 1:
                raise InvalidInput(f"{path}: {alpha_key}: alpha must be one number, found shape {tuple(value.shape)}")
            alpha = float(value.reshape(-1)[0])
        scale = 1.0 if alpha is None else alpha / (math.sqrt(rank) if rs else rank)
        updates.append(Update(network, layer, down, up, scale))
    return LoadedLora(path, (after.st_size, after.st_mtime_ns), identity.sha256, tuple(updates))


# -- merging and restoring --------------------------------------------------------------

def _packed(weight: Tensor) -> bool:
    """Is this a CPU conv's weight laid out for oneDNN (`unet.Conv2d`)? Such a weight is
    replaced, never written, and the conv lays the new one out again on its next call."""
    return weight.is_mkldnn


def _lent(weight: Tensor, original: Tensor) -> bool:
    """Is the layer's weight the original itself (lent to a packed conv by `_restore_layer`)?"""
    return weight.untyped_storage().data_ptr() == original.untyped_storage().data_ptr()


def _set_weight(module: nn.Module, weight: Tensor) -> None:
    module.weight = nn.Parameter(weight, requires_grad=False)


def _merge_layer(module: nn.Module, original: Tensor, up: Tensor, down: Tensor, factor: float) -> None:
    """weight = original + factor * up @ down, the sum in float32 and cast once to the weight's
    dtype. Read from the original, never from the weight, so a switch needs no restore first;
    one pass over the weight where it is written in place."""
    weight, rows = module.weight, up.shape[0]
    if _packed(weight) or _lent(weight, original):
        # A fresh plain tensor (a packed weight is fp32, so is its original): un-packing the
        # old one would be a wasted relayout, and a lent original must stay as it is.
        merged = torch.addmm(original.reshape(rows, -1), up, down, alpha=factor)
        _set_weight(module, merged.view(original.shape))
    elif weight.dtype == torch.float32 and weight.is_contiguous() and original.is_contiguous():
        torch.addmm(original.view(rows, -1), up, down, alpha=factor, out=weight.view(rows, -1))
    else:  # half precision, or channels_last (the CUDA layout): the sum in float32, then one copy
        merged = torch.addmm(original.to(torch.float32, memory_format=torch.contiguous_format)
                             .view(rows, -1), up, down, alpha=factor)
        weight.copy_(merged.view(original.shape))


def _restore_layer(module: nn.Module, original: Tensor) -> None:
    """Put a layer's original weight back: copied in place (CUDA graphs and compiled callables
    keep seeing the parameter they captured), except a packed conv's, which gets the original
    itself, lent: the conv's next call lays it out anew into a tensor of its own, and a merge
    never writes into a lent weight (`_merge_layer`)."""
    weight = module.weight
    if _packed(weight):
        _set_weight(module, original)
    elif not _lent(weight, original):
        weight.copy_(original)


class Adapters:
    """The LoRA set merged into a pipeline's networks now, and the way back to the base weights.

    `apply(set)` merges a set, once (the same set again is free). Switching sets writes each
    layer the new set changes straight from its original (`_merge_layer`, one matrix product
    per layer), and restores only the layers the old set changed and the new one does not: one
    pass over each weight a switch changes. Restored weights are the originals bit for bit.
    Memory: one original per weight any set has touched (kept for the next switch; at most the
    LoRA-addressable layers once, whatever the number of LoRAs used) plus `cache_files` loaded
    files. Weights change in place (except CPU convs' oneDNN-packed ones, which their next call
    packs again anyway), so CUDA graphs and compiled callables see the merge."""

    def __init__(self, unet: UNetModel, text_encoder: nn.Module, *, dirs: Sequence[Path | str] = (),
                 cache_files: int = DEFAULT_CACHE_FILES) -> None:
        self.networks: dict[str, nn.Module] = {"unet": unet, "text_encoder": text_encoder}
        self.dirs = [Path(d) for d in dirs]
        self.cache_files = cache_files
        self.current: LoraSet = ()
        self._files: OrderedDict[Path, LoadedLora] = OrderedDict()
        self._originals: dict[tuple[str, str], Tensor] = {}
        self._layers: dict[tuple[str, str], nn.Module] = {}
        self._merged: set[tuple[str, str]] = set()

    @cached_property
    def _tables(self) -> dict[str, dict[str, str]]:
        # Built on the first LoRA read: a pipeline that never takes one (or a stand-in
        # network without the UNet's config) never walks its layers.
        return layer_tables(self.networks["unet"], self.networks["text_encoder"])

    def load(self, lora: Lora) -> LoadedLora:
        """The named file, from the cache while it is unchanged on disk; it must be the file
        the job recorded (`lora.sha256`), never another one under the same name."""
        path = find_lora(lora.name, self.dirs)
        info = path.stat()
        loaded = self._files.pop(path, None)
        if loaded is None or loaded.stat != (info.st_size, info.st_mtime_ns):
            loaded = read_lora(path, self.networks, self._tables)
        self._files[path] = loaded
        while len(self._files) > self.cache_files:
            self._files.popitem(last=False)
        if lora.sha256 and loaded.sha256 != lora.sha256:
            raise InvalidInput(f"lora {lora.name}: {path} has sha256 {loaded.sha256[:12]}, not the "
                               f"{lora.sha256[:12]} the job recorded; restore that file or resubmit")
        return loaded

    def _layer(self, key: tuple[str, str]) -> nn.Module:
        """The layer a key names, looked up once (a switch visits every layer a set changes)."""
        layer = self._layers.get(key)
        if layer is None:
            layer = self._layers[key] = self.networks[key[0]].get_submodule(key[1])
        return layer

    def _original(self, key: tuple[str, str]) -> Tensor:
        """The layer's base weight, copied (in its plain layout) the first time a set touches it."""
        original = self._originals.get(key)
        if original is None:
            weight = self._layer(key).weight.detach()
            original = self._originals[key] = weight.to_dense() if _packed(weight) else weight.clone()
        return original

    @torch.inference_mode()
    def apply(self, loras: Iterable[tuple[str, float, str | None]]) -> None:
        """Merge `loras` (the empty set: the base model). Every file is read and checked before
        any weight changes, so a bad file leaves the model as it was."""
        wanted = canonical(loras)
        if wanted == self.current:
            return
        updates: dict[tuple[str, str], list[tuple[Update, float]]] = {}
        for lora in wanted:
            for update in self.load(lora).updates:
                updates.setdefault((update.network, update.path), []).append((update, lora.weight))
        for key in self._merged - set(updates):
            _restore_layer(self._layer(key), self._originals[key])
        # What stays merged of the old set is rewritten below; a failure restores it too.
        self._merged &= set(updates)
        self.current = ()
        try:
            for key, parts in updates.items():
                original = self._original(key)
                self._merged.add(key)
                _merge_layer(self._layer(key), original, *_low_rank(parts, original.device))
        except BaseException:
            self.restore()
            raise
        self.current = wanted

    @torch.inference_mode()
    def restore(self) -> None:
        """Put back the original of every weight the current set changed."""
        for key in self._merged:
            _restore_layer(self._layer(key), self._originals[key])
        self._merged = set()
        self.current = ()

    def memory_bytes(self) -> dict[str, int]:
        """What the adapters hold beyond the model: originals of touched weights, loaded files."""
        return {"originals": sum(t.nbytes for t in self._originals.values()),
                "files": sum(f.nbytes for f in self._files.values())}
