"""Textual-inversion embedding files by name, and the names' tokens: what a prompt names.

Imports no torch, so `sdq submit` can record the embeddings a prompt uses (name and the
file's sha256) without loading the model stack; `embeddings.EmbeddingRegistry` reads the
vectors behind the names. As in A1111 an embedding is named by its file's stem and found in
a prompt by the tokens of that name (`EasyNegative` matches `easynegative,` but not
`easynegatives`); the longest name wins where several start at one token.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from sdq.core.errors import InvalidInput

from . import modelfiles

SUFFIXES = (".safetensors", ".pt", ".bin")


def embedding_files(folder: Path) -> Iterator[Path]:
    """The folder's embedding files, subfolders included (A1111 reads them too); hidden ones
    and empty files (A1111 skips those) left out."""
    for path in sorted(folder.rglob("*")):
        hidden = any(part.startswith(".") for part in path.relative_to(folder).parts)
        if not hidden and path.suffix.lower() in SUFFIXES and path.is_file() and path.stat().st_size:
            yield path


def file_sha256(path: Path) -> str:
    """An embedding's identity: the sha256 of its file (InvalidInput when it cannot be read)."""
    try:
        return modelfiles.file_sha256(path)
    except OSError as exc:
        raise InvalidInput(f"{path}: cannot read: {exc.strerror or exc}") from None


class EmbeddingNames:
    """The embedding files of one folder, and their names as one tokenizer spells them:
    the `prompts.NameMatcher` of `prompts.embedding_names`."""

    def __init__(self, folder: Path | str, tokenizer: Any) -> None:
        self.folder = Path(folder).expanduser()
        if not self.folder.is_dir():
            raise InvalidInput(f"embeddings folder {self.folder}: not a directory")
        self.files: dict[str, list[Path]] = {}
        for path in embedding_files(self.folder):
            self.files.setdefault(path.stem, []).append(path)
        names = sorted(self.files)
        name_ids = tokenizer(names, add_special_tokens=False, verbose=False)["input_ids"] if names else []
        spelled: dict[tuple[int, ...], list[str]] = {}
        for name, ids in zip(names, name_ids):
            if ids:
                spelled.setdefault(tuple(ids), []).append(name)
        self._by_first: dict[int, list[tuple[tuple[int, ...], list[str]]]] = {}
        for ids, same in sorted(spelled.items(), key=lambda item: -len(item[0])):
            self._by_first.setdefault(ids[0], []).append((ids, same))

    def path(self, name: str) -> Path:
        """The one file named `name`; InvalidInput for none, or two files sharing the name."""
        paths = self.files.get(name)
        if not paths:
            raise InvalidInput(f"no embedding {name!r} in {self.folder}")
        if len(paths) > 1:
            raise InvalidInput(f"embedding {name!r} is ambiguous: {', '.join(str(p) for p in paths)}")
        return paths[0]

    def match(self, tokens: Sequence[int], position: int) -> tuple[str, int] | None:
        """(name, tokens it takes) of the embedding whose name's tokens start at `position`,
        the longest name first; InvalidInput for two names that read as the same tokens."""
        for ids, names in self._by_first.get(tokens[position], ()):
            if tuple(tokens[position: position + len(ids)]) == ids:
                if len(names) > 1:
                    raise InvalidInput(f"embedding names {', '.join(names)} read as the same tokens "
                                       f"in {self.folder}: rename one")
                return names[0], len(ids)
        return None
