"""Reading model weights: single-file LDM checkpoints and diffusers-format folders, offline.

Our modules' attribute paths are the LDM checkpoint's key names, so a single file loads by
name; a diffusers folder is renamed into that layout first (`diffusers_unet_to_ldm`,
`diffusers_vae_to_ldm`). Missing, unexpected or mis-shaped weights are an error naming them:
a silently half-loaded model makes plausible-looking noise, which is worse than a clear failure.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Mapping, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from sdq.core.errors import InvalidInput, NotFound
from sdq.core.params import HUB_REPO_ID, short_hash

from .configs import unet_config_from_diffusers, vae_config_from_diffusers
from .files import write_atomically

# The names under which released SD .ckpt files pickle harmless training state.
_INERT_GLOBALS = (
    "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
    "lightning.pytorch.callbacks.model_checkpoint.ModelCheckpoint",
)

PREFIXES = {
    "unet": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "text_encoder": "cond_stage_model.transformer.",
}

# Keys that real checkpoints carry but inference does not use: EMA copies, the DDPM schedule
# (we compute it), the loss's log-variance, and CLIP's position-id buffer.
_IGNORED = re.compile(
    r"^model_ema\.|(^|\.)logvar$|\.position_ids$|^(betas|alphas_cumprod|alphas_cumprod_prev"
    r"|sqrt_alphas_cumprod|sqrt_one_minus_alphas_cumprod|log_one_minus_alphas_cumprod"
    r"|sqrt_recip_alphas_cumprod|sqrt_recipm1_alphas_cumprod|posterior_variance"
    r"|posterior_log_variance_clipped|posterior_mean_coef1|posterior_mean_coef2)$"
)


class CheckpointError(InvalidInput):
    """A weights file that cannot be used as it is; the message names the file and the keys."""

    def __init__(self, source: Path | str, problem: str) -> None:
        super().__init__(f"{source}: {problem}")
        self.source, self.problem = str(source), problem


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
        for k in expected.keys() & sd.keys()
        if sd[k].shape != expected[k].shape
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


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _folder_files(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def file_identity(path: Path) -> dict[str, int]:
    """What tells, without reading a file, that it is the one hashed before. Size and mtime
    alone do not: a checkpoint replaced in place by one of the same size with its time kept
    (`cp -p`, `rsync -t`, tar) has both. Replacing a file gives it a new inode or a new ctime,
    and no user call sets a ctime back."""
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino,
            "ctime_ns": st.st_ctime_ns}


def model_identity(path: Path) -> list[tuple[str, dict[str, int]]]:
    """`file_identity` of every file a model is read from (one, or a folder's)."""
    path = path.resolve()
    files = _folder_files(path) if path.is_dir() else [path]
    return [(str(p), file_identity(p)) for p in files]


def model_sha256(path: Path, cache_file: Path | None = None) -> str:
    """A model's identity: the sha256 of its weights file, or for a folder the sha256 of its
    sorted `relative-path NUL file-sha256` lines. Cached by path and `file_identity`, since
    hashing a 4 GB checkpoint takes seconds on every worker start otherwise. CheckpointError
    if a file changes while it is hashed."""
    path = path.resolve()
    cache: dict[str, Any] = {}
    if cache_file is not None and cache_file.is_file():
        try:
            cache = json.loads(cache_file.read_text())
        except ValueError:
            cache = {}

    def cached(p: Path) -> str:
        identity = file_identity(p)
        hit = cache.get(str(p))
        if hit and all(hit.get(k) == v for k, v in identity.items()):
            return hit["sha256"]
        sha = file_sha256(p)
        if file_identity(p) != identity:
            raise CheckpointError(p, "changed while it was being hashed; try again once it "
                                     "is written")
        cache[str(p)] = {**identity, "sha256": sha}
        return sha

    if path.is_dir():
        lines = "".join(f"{p.relative_to(path).as_posix()}\0{cached(p)}\n" for p in _folder_files(path))
        sha = hashlib.sha256(lines.encode()).hexdigest()
    else:
        sha = cached(path)
    if cache_file is not None:
        write_atomically(cache_file, json.dumps(cache).encode())
    return sha


def model_changed(ref: str, recorded: str, found: str) -> str:
    """Why items recorded for the model `recorded` fail on a worker whose `ref` now holds
    `found`: the file changed since the job was submitted, and making them with other weights
    would record images under a hash they were not made with."""
    return (f"model {ref} changed since the job was submitted: its sha256 is now "
            f"{short_hash(found)}, the job recorded {short_hash(recorded)}; submit again for the "
            "new weights, or put the old file back and `sdq retry` the job")


def folder_weights(folder: Path, stem: str) -> Path:
    """The weights file of one component of a diffusers folder (`unet/`, `vae/`, ...)."""
    for name in (f"{stem}.safetensors", f"{stem}.fp16.safetensors", f"{stem}.bin", f"{stem}.fp16.bin"):
        if (folder / name).is_file():
            return folder / name
    raise CheckpointError(folder, f"no {stem}.safetensors or {stem}.bin")


class ModelNotFound(NotFound):
    """A model reference that names neither a local file or folder nor a reachable/cached repo."""


# What a diffusers-format repository needs to be fetched for inference.
_REPO_FILES = [
    "model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json", "vae/diffusion_pytorch_model.safetensors", "text_encoder/config.json",
    "text_encoder/model.safetensors", "tokenizer/*",
]


WEIGHT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
"""The single-file checkpoints `read_weights` reads: safetensors, or PyTorch's own format."""
MAX_HEADER_BYTES = 100 * 2**20
"""The largest safetensors header taken (the safetensors library's own limit); a real SD
checkpoint's is about 100 kB."""
_TORCH_MAGIC = (b"PK\x03\x04", b"\x80")
"""The first bytes of `torch.save` files: a zip archive, or (legacy) a pickle."""


def read_config(part: Path) -> dict[str, Any]:
    """A diffusers folder component's config.json, as a dict."""
    file = part / "config.json"
    if not file.is_file():
        raise CheckpointError(part.parent, f"not a diffusers model folder: {part.name}/config.json missing")
    try:
        config = json.loads(file.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(file, f"not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise CheckpointError(file, f"expected a JSON object, found {type(config).__name__}")
    return config


def _check_safetensors(path: Path, size: int) -> None:
    """The header must be a safetensors header naming the three networks' weights."""
    with path.open("rb") as fh:
        head = fh.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 2 <= length <= min(MAX_HEADER_BYTES, size - 8):
            raise CheckpointError(path, f"not a .safetensors file ({size} bytes, no valid header)")
        try:
            header = json.loads(fh.read(length))
        except (ValueError, UnicodeDecodeError):
            raise CheckpointError(path, "not a .safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(path, "not a .safetensors file (its header is not a JSON object)")
    missing = [prefix + "*" for prefix in PREFIXES.values()
               if not any(key.startswith(prefix) for key in header)]
    if missing:
        raise CheckpointError(path, f"not an SD v1 checkpoint: no weights under {', '.join(missing)}")


def _check_folder(folder: Path) -> None:
    """A diffusers folder: each network's config is one sdq runs, and its weights are there."""
    for part, stem, architecture in (
        ("unet", "diffusion_pytorch_model", unet_config_from_diffusers),
        ("vae", "diffusion_pytorch_model", vae_config_from_diffusers),
        ("text_encoder", "model", None),
    ):
        config = read_config(folder / part)
        if architecture is not None:
            try:
                architecture(config)
            except (ValueError, TypeError, KeyError) as exc:
                raise CheckpointError(folder / part / "config.json", str(exc)) from None
        folder_weights(folder / part, stem)


def check_model(path: Path) -> None:
    """Refuse what cannot be a model before anything hashes, records or loads it, reading no
    more than a header or the folder's configs: a device (`/dev/zero` would hash forever), a
    folder that is not a diffusers model (`/etc`), a file that is not a checkpoint."""
    try:
        info = path.stat()
    except OSError as exc:
        raise CheckpointError(path, f"cannot read: {exc.strerror or exc}") from None
    if stat.S_ISDIR(info.st_mode):
        _check_folder(path)
        return
    if not stat.S_ISREG(info.st_mode):
        raise CheckpointError(path, "not a regular file or a folder")
    if path.suffix.lower() not in WEIGHT_SUFFIXES:
        raise CheckpointError(path, f"not a checkpoint: expected a {', '.join(WEIGHT_SUFFIXES)} "
                                    "file or a diffusers model folder")
    try:
        if path.suffix.lower() == ".safetensors":
            _check_safetensors(path, info.st_size)
            return
        with path.open("rb") as fh:
            head = fh.read(4)
    except OSError as exc:
        raise CheckpointError(path, f"cannot read: {exc.strerror or exc}") from None
    if not head.startswith(_TORCH_MAGIC):
        raise CheckpointError(path, f"not a PyTorch checkpoint ({info.st_size} bytes, "
                                    "neither a zip archive nor a pickle)")


def resolve_model_ref(ref: str | Path, files: Sequence[str] | None = None) -> Path:
    """A local file or folder as its absolute path (`..` folded, links kept); a Hugging Face
    repo id from the HF cache (fetched into it first when the network allows), only `files` of
    it (default: a model's). A model (no `files`) must pass `check_model`."""
    path = Path(ref).expanduser()
    if path.exists():
        path = Path(os.path.abspath(path))
        if files is None:
            check_model(path)
        return path
    text = str(ref)
    if not HUB_REPO_ID.fullmatch(text) or path.suffix in (".safetensors", ".ckpt"):
        raise ModelNotFound(f"{text}: no such checkpoint file or model folder")
    from huggingface_hub import snapshot_download

    patterns = list(files or _REPO_FILES)
    try:
        path = Path(snapshot_download(text, allow_patterns=patterns, local_files_only=True))
    except Exception:
        try:
            path = Path(snapshot_download(text, allow_patterns=patterns))
        except Exception as exc:
            raise ModelNotFound(
                f"{text}: not in the Hugging Face cache and could not be downloaded "
                f"({type(exc).__name__}). Pass a local checkpoint instead, e.g. "
                "--model /path/to/v1-5-pruned-emaonly.safetensors, or a diffusers folder."
            ) from None
    if files is None:
        check_model(path)
    return path
