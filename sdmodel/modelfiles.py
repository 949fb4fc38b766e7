"""Model files without the model: which reference names which files, whether they can be a
model at all (a header or the folder's configs, never the weights), and their sha256.

Everything here reads files and JSON only, so the commands that plan, record or route work
(`sdq submit --dry-run`, `sdq models add`, a worker choosing its queue) name and hash models
without importing torch; `checkpoint` reads the weights themselves.
"""
from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path
from typing import Any, Sequence

from sdq.core.errors import InvalidInput, NotFound
from sdq.core.params import HUB_REPO_ID, short_hash

from .configs import unet_config_from_diffusers, vae_config_from_diffusers
from .files import write_atomically

PREFIXES = {
    "unet": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "text_encoder": "cond_stage_model.transformer.",
}

class CheckpointError(InvalidInput):
    """A weights file that cannot be used as it is; the message names the file and the keys."""

    def __init__(self, source: Path | str, problem: str) -> None:
        super().__init__(f"{source}: {problem}")
        self.source, self.problem = str(source), problem


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def folder_files(folder: Path) -> list[Path]:
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
    files = folder_files(path) if path.is_dir() else [path]
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
        lines = "".join(f"{p.relative_to(path).as_posix()}\0{cached(p)}\n" for p in folder_files(path))
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
