"""Textual-inversion embeddings: a folder of files, each file's name standing for its vectors.

As in A1111, an embedding is named by its file's stem and is found in a prompt by the tokens of
that name (so `EasyNegative` matches `easynegative,` but not `easynegatives`); its vectors take
the place of those tokens and count as that many tokens of a chunk. Files are read when a
prompt first names them, so a folder shared between model families only fails for the
embedding a prompt actually uses. Formats read:

- A1111 `.safetensors`: one tensor `emb_params` (vectors x width);
- A1111 `.pt`: `{"string_to_param": {"*": tensor}, ...}`, through the restricted unpickler;
- diffusers `learned_embeds.bin` / `.safetensors`: `{"<token>": tensor}`, one or more vectors.

An embedding's identity is the sha256 of its file, hashed from the same bytes its vectors are
read from.
"""
from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from torch import Tensor

from sdq.core.errors import InvalidInput

from .checkpoint import unpickle
from .modelfiles import CheckpointError
from .prompts import CHUNK_TOKENS, EmbeddingMatch, prompt_chunks

SUFFIXES = (".safetensors", ".pt", ".bin")


@dataclass(frozen=True, eq=False)
class Embedding:
    """One embedding file, read."""

    name: str
    path: Path
    sha256: str
    vectors: Tensor
    """(vectors, width), float32 on the CPU."""


def _single_tensor(data: Mapping[str, Any], path: Path) -> Tensor:
    """The vectors of whichever layout `data` has; CheckpointError for any other."""
    if "string_to_param" in data:
        data = data["string_to_param"]
        if not isinstance(data, Mapping):
            raise CheckpointError(path, f"string_to_param is a {type(data).__name__}, not a dict of tensors")
    elif "emb_params" in data:
        data = {"emb_params": data["emb_params"]}
    elif {"clip_l", "clip_g"} <= data.keys():
        raise CheckpointError(path, "an SDXL embedding (clip_l, clip_g): sdq runs SD v1 models")
    tensors = [value for value in data.values() if isinstance(value, Tensor)]
    if len(data) != 1 or len(tensors) != 1:
        raise CheckpointError(path, "not a textual-inversion embedding: expected one tensor "
                                    f"(emb_params, string_to_param or a diffusers token), found {sorted(data)[:8]}")
    return tensors[0]


def read_embedding(path: Path, width: int | None = None) -> Embedding:
    """The embedding in `path`, checked: a float tensor of 1 to 75 finite vectors, each `width`
    wide when a width is given (the text encoder's); CheckpointError (InvalidInput) naming the
    file otherwise."""
    content = path.read_bytes()
    if path.suffix.lower() == ".safetensors":
        try:
            data: Any = load_safetensors(content)
        except SafetensorError as exc:
            raise CheckpointError(path, f"unreadable .safetensors file: {exc}") from None
    else:
        data = unpickle(io.BytesIO(content), path)
    if not isinstance(data, Mapping):
        raise CheckpointError(path, f"expected a dict of tensors, found {type(data).__name__}")
    vectors = _single_tensor(data, path)
    if not vectors.is_floating_point():
        raise CheckpointError(path, f"vectors of type {vectors.dtype}: floats expected")
    vectors = vectors.detach().to("cpu", torch.float32)
    if vectors.dim() == 1:
        vectors = vectors[None]
    if vectors.dim() != 2 or not 1 <= len(vectors) <= CHUNK_TOKENS:
        raise CheckpointError(path, f"vectors of shape {tuple(vectors.shape)}: "
                                    f"expected (1 to {CHUNK_TOKENS} vectors, width)")
    if width is not None and vectors.shape[1] != width:
        raise CheckpointError(path, f"vectors {vectors.shape[1]} wide: this model's text encoder takes {width}")
    if not torch.isfinite(vectors).all():
        raise CheckpointError(path, "vectors hold NaN or infinite values")
    return Embedding(path.stem, path, hashlib.sha256(content).hexdigest(), vectors)


def _embedding_files(folder: Path) -> Iterator[Path]:
    """The folder's embedding files, subfolders included (A1111 reads them too); hidden ones
    and empty files (A1111 skips those) left out."""
    for path in sorted(folder.rglob("*")):
        hidden = any(part.startswith(".") for part in path.relative_to(folder).parts)
        if not hidden and path.suffix.lower() in SUFFIXES and path.is_file() and path.stat().st_size:
            yield path


class EmbeddingRegistry:
    """The embeddings of one folder for one tokenizer (and, given `width`, one text encoder):
    what a prompt's tokens name, and the files behind the names.

    It is the `EmbeddingFinder` of `prompts.prompt_chunks`; `used_in(prompt)` lists what a
    prompt uses, with each file's sha256, for the record.
    """

    def __init__(self, folder: Path | str, tokenizer: Any, width: int | None = None) -> None:
        self.folder = Path(folder).expanduser()
        if not self.folder.is_dir():
            raise InvalidInput(f"embeddings folder {self.folder}: not a directory")
        self.tokenizer, self.width = tokenizer, width
        self._files: dict[str, list[Path]] = {}
        for path in _embedding_files(self.folder):
            self._files.setdefault(path.stem, []).append(path)
        names = sorted(self._files)
        name_ids = tokenizer(names, add_special_tokens=False, verbose=False)["input_ids"] if names else []
        spelled: dict[tuple[int, ...], list[str]] = {}
        for name, ids in zip(names, name_ids):
            if ids:
                spelled.setdefault(tuple(ids), []).append(name)
        self._by_first: dict[int, list[tuple[tuple[int, ...], list[str]]]] = {}
        for ids, same in sorted(spelled.items(), key=lambda item: -len(item[0])):
            self._by_first.setdefault(ids[0], []).append((ids, same))
        self._loaded: dict[str, Embedding] = {}

    @property
    def names(self) -> list[str]:
        return sorted(self._files)

    def get(self, name: str) -> Embedding:
        """The embedding `name`, read on first use; InvalidInput for a name that two files
        share, or a file that is not a usable embedding."""
        if name not in self._loaded:
            paths = self._files.get(name)
            if not paths:
                raise InvalidInput(f"no embedding {name!r} in {self.folder}")
            if len(paths) > 1:
                raise InvalidInput(f"embedding {name!r} is ambiguous: {', '.join(str(p) for p in paths)}")
            self._loaded[name] = read_embedding(paths[0], self.width)
        return self._loaded[name]

    def find(self, tokens: Sequence[int], position: int) -> EmbeddingMatch | None:
        """The embedding whose name's tokens start at `position`, the longest name first."""
        for ids, names in self._by_first.get(tokens[position], ()):
            if tuple(tokens[position: position + len(ids)]) == ids:
                if len(names) > 1:
                    raise InvalidInput(f"embedding names {', '.join(names)} read as the same tokens "
                                       f"in {self.folder}: rename one")
                embedding = self.get(names[0])
                return EmbeddingMatch(embedding.name, len(ids), len(embedding.vectors))
        return None

    def used_in(self, prompt: str) -> list[Embedding]:
        """The embeddings `prompt` uses when read with the `a1111` syntax, in order of first
        use (`plain` prompts use none)."""
        used = {name: None for chunk in prompt_chunks(prompt, self.tokenizer, self)
                for _, name in chunk.embeddings}
        return [self.get(name) for name in used]
