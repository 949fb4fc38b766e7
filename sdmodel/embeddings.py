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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from torch import Tensor

from sdq.core.errors import InvalidInput

from .checkpoint import unpickle
from .embedding_files import EmbeddingNames
from .modelfiles import CheckpointError
from .prompts import CHUNK_TOKENS, EmbeddingMatch, embedding_names

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


class EmbeddingRegistry:
    """The embeddings of one folder for one tokenizer (and, given `width`, one text encoder):
    what a prompt's tokens name, and the files behind the names.

    It is the `EmbeddingFinder` of `prompts.prompt_chunks`; `used_in(prompt)` lists what a
    prompt uses, with each file's sha256, for the record.
    """

    def __init__(self, folder: Path | str, tokenizer: Any, width: int | None = None) -> None:
        self.files = EmbeddingNames(folder, tokenizer)
        self.folder, self.tokenizer, self.width = self.files.folder, tokenizer, width
        self._loaded: dict[str, Embedding] = {}

    @property
    def names(self) -> list[str]:
        return sorted(self.files.files)

    def get(self, name: str) -> Embedding:
        """The embedding `name`, read on first use; InvalidInput for a name that two files
        share, or a file that is not a usable embedding."""
        if name not in self._loaded:
            self._loaded[name] = read_embedding(self.files.path(name), self.width)
        return self._loaded[name]

    def find(self, tokens: Sequence[int], position: int) -> EmbeddingMatch | None:
        """The embedding whose name's tokens start at `position`, the longest name first."""
        found = self.files.match(tokens, position)
        if found is None:
            return None
        embedding = self.get(found[0])
        return EmbeddingMatch(embedding.name, found[1], len(embedding.vectors))

    def used_in(self, prompt: str) -> list[Embedding]:
        """The embeddings `prompt` uses when read with the `a1111` syntax, in order of first
        use (`plain` prompts use none)."""
        return [self.get(name) for name in embedding_names(prompt, self.tokenizer, self.files)]


def embeddings_problem(embeddings: EmbeddingRegistry | None, prompts: Sequence[str], syntax: str,
                       records: Sequence[Mapping[str, Any]]) -> str | None:
    """Why an item cannot be made here with the embeddings it records ({name, sha256}), or None.

    Its prompts must name here exactly the embeddings it recorded when it was submitted (a
    worker with another embeddings folder would otherwise make an image its record does not
    describe), each file with the recorded sha256 (never other vectors under the same name)."""
    recorded = {record["name"]: record.get("sha256") for record in records}
    used: dict[str, None] = {}
    try:
        if embeddings is not None and syntax == "a1111":
            for prompt in prompts:
                used.update(dict.fromkeys(embedding_names(prompt, embeddings.tokenizer, embeddings.files)))
        if set(used) != set(recorded):
            here = f"in {embeddings.folder}" if embeddings is not None else "with no embeddings folder here"
            return (f"embeddings: its prompts name {', '.join(used) or 'none'} {here}, the job "
                    f"recorded {', '.join(recorded) or 'none'}; give workers the submitter's "
                    "embeddings folder (SDQ_EMBEDDINGS_DIR)")
        for name, sha256 in recorded.items():
            assert embeddings is not None  # a recorded name was found there
            found = embeddings.get(name)
            if sha256 and found.sha256 != sha256:
                return (f"embedding {name}: {found.path} has sha256 {found.sha256[:12]}, not the "
                        f"{sha256[:12]} the job recorded; restore that file or resubmit")
    except InvalidInput as exc:
        return f"embeddings: {exc}"
    return None
