"""LoRA files on disk: finding one by name in a list of folders, and its identity.

Imports no torch, so `sdq submit` can check and record every named LoRA before anything is
queued without loading the model stack; `sdmodel.lora` reads the tensors.

Two hashes per file, for two readers:
- `sha256`, of the whole file: sdq's identity of the adapter (cache key, `reproduce`, and the
  check that a worker's copy is the file the job was submitted with), like a model's sha256;
- `a1111_hash`, the 12 hex digits AUTOMATIC1111's web UI prints in its `Lora hashes` infotext
  field, which civitai ("AutoV3") and A1111 itself look adapters up by. For a `.safetensors`
  file that is the sha256 of the bytes after the header (kohya-ss' "addnet" hash, so editing
  the metadata leaves it unchanged), or the `sshs_model_hash` the trainer wrote into the
  metadata when there is one, as A1111 prefers it; for other files the sha256 of the whole file.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdq.core.errors import InvalidInput, NotFound

LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt")
"""What a name may resolve to, in order of preference: safetensors, then PyTorch files (read
only through the restricted unpickler)."""
A1111_HASH_LEN = 12
MAX_HEADER_BYTES = 100 * 2**20
"""The largest safetensors header taken (the safetensors library's own limit)."""


@dataclass(frozen=True)
class LoraFile:
    """One adapter file as a job records it."""

    name: str
    path: Path
    sha256: str
    a1111_hash: str


def find_lora(name: str, dirs: Sequence[Path | str]) -> Path:
    """`NAME.safetensors` (or `.pt`, `.ckpt`) in the first folder of `dirs` that has it.

    A name is a file name without its suffix, never a path: a prompt must not reach outside
    the folders the user listed."""
    if not name or name in (".", "..") or any(sep in name for sep in ("/", "\\", "\0")):
        raise InvalidInput(f"lora: {name!r} is not a LoRA name (a file name without its suffix)")
    for folder in dirs:
        for suffix in LORA_SUFFIXES:
            path = Path(folder).expanduser() / f"{name}{suffix}"
            if path.is_file():
                return path
    where = ", ".join(str(d) for d in dirs) or "no LoRA folder (set --lora-dir or SDQ_LORA_DIR)"
    raise NotFound(f"lora: no {name}.safetensors in {where}")


def safetensors_header(path: Path) -> tuple[int, dict[str, Any]]:
    """The header's length in bytes and its JSON object; a file that has no valid header is
    not a safetensors file, whatever its name says."""
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            head = fh.read(8)
            length = int.from_bytes(head, "little") if len(head) == 8 else -1
            if not 2 <= length <= min(MAX_HEADER_BYTES, size - 8):
                raise InvalidInput(f"{path}: not a .safetensors file ({size} bytes, no valid header)")
            header = json.loads(fh.read(length))
    except OSError as exc:
        raise InvalidInput(f"{path}: cannot read: {exc.strerror or exc}") from None
    except (ValueError, UnicodeDecodeError):
        raise InvalidInput(f"{path}: not a .safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise InvalidInput(f"{path}: not a .safetensors file (its header is not a JSON object)")
    return length, header


def safetensors_metadata(path: Path) -> dict[str, str]:
    """The free-form `__metadata__` strings of a safetensors file (training notes, PEFT config)."""
    return _metadata(safetensors_header(path)[1])


def _metadata(header: dict[str, Any]) -> dict[str, str]:
    metadata = header.get("__metadata__")
    return {k: v for k, v in metadata.items() if isinstance(v, str)} if isinstance(metadata, dict) else {}


def describe_lora(path: Path, name: str | None = None) -> LoraFile:
    """Both hashes of a file, read in one pass."""
    whole = hashlib.sha256()
    data = hashlib.sha256()
    metadata: dict[str, str] = {}
    skip = 0
    if path.suffix.lower() == ".safetensors":
        length, header = safetensors_header(path)
        skip, metadata = 8 + length, _metadata(header)
    try:
        with path.open("rb") as fh:
            head = fh.read(skip)
            whole.update(head)
            while chunk := fh.read(1 << 22):
                whole.update(chunk)
                data.update(chunk)
    except OSError as exc:
        raise InvalidInput(f"{path}: cannot read: {exc.strerror or exc}") from None
    a1111 = metadata.get("sshs_model_hash") or (data if skip else whole).hexdigest()
    return LoraFile(name or path.stem, path, whole.hexdigest(), a1111[:A1111_HASH_LEN])


def a1111_lora_hashes(entries: Iterable[tuple[str, str]]) -> str:
    """The value of A1111's `Lora hashes` infotext field from (name as written in the prompt,
    a1111_hash) pairs: `name: hash, name2: hash2`, with `:` and `,` taken out of the names
    as A1111 does so the field parses back. (The infotext writer quotes the whole value.)"""
    return ", ".join(f"{name.replace(':', '').replace(',', '')}: {short}" for name, short in entries)
