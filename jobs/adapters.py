"""The LoRAs and embeddings of each image, found and hashed when it is submitted.

Submitting records, per item, every LoRA it gets (its prompt's `<lora:NAME:WEIGHT>` tags and
the job's `--lora` options) as `{name, weight, sha256, a1111}`, and every textual-inversion
embedding its prompt or negative prompt names as `{name, sha256}`, before anything is queued:
a name no file answers to is a problem of its line (`FILE:LINE: lora: no NAME.safetensors in
DIR`), and a worker later refuses a file whose hash is not the recorded one. Nothing here loads
the model stack: files are found and hashed by `sdmodel.lora_files` and
`sdmodel.embedding_files`, and embedding names are matched on the tokenizer's tokens, as the
text encoder's path matches them (`sdmodel.prompts.embedding_names`).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from sdq.core.errors import InvalidInput, NotFound
from sdq.core.jobspec import JobSpec
from sdq.core.settings import Settings
from sdq.core.loratags import lora_tags, parse_lora_option
from sdq.core.params import ParamError, adapter_record
from sdq.sdmodel.embedding_files import EmbeddingNames, file_sha256
from sdq.sdmodel.lora_files import LoraFile, describe_lora, find_lora

Records = tuple[list[dict[str, Any]], list[dict[str, Any]]]
"""(loras, embeddings) as an item records them (`params.adapter_record`)."""


@dataclass
class AdapterFinder:
    """Finds and hashes what items name, each file once per submission.

    `loras` are the job's `--lora NAME[:WEIGHT]` options; a prompt's tag for the same name
    takes their place (its weight is the one written beside the prompt). `tokenizer` (the
    model's, default the shipped CLIP one) spells embedding names."""

    lora_dirs: Sequence[Path | str] = ()
    embeddings_dir: Path | str | None = None
    loras: Sequence[str] = ()
    tokenizer: Any = None
    _files: dict[str, LoraFile] = field(default_factory=dict)
    _embeddings: EmbeddingNames | None = None
    _hashes: dict[Path, str] = field(default_factory=dict)
    _seen: dict[tuple[str, str, str], Records] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._options = [parse_lora_option(lora) for lora in self.loras]

    def resolve(self, prompt: str, negative_prompt: str, syntax: str) -> Records:
        """The records of one image; ParamError naming `lora` or `embeddings` for a name that
        has no usable file (a tag with no LoRA folder given too: it is never dropped
        silently). A `plain` prompt's tags are text: only `--lora` applies to it."""
        tags = lora_tags(prompt) if syntax == "a1111" else []
        if not tags and not self._options and (self.embeddings_dir is None or syntax != "a1111"):
            return [], []  # the common case, without keeping every prompt seen
        key = (prompt, negative_prompt, syntax)
        if key not in self._seen:
            named = dict(self._options) | dict(tags)
            loras = [self._lora(name, weight) for name, weight in named.items()]
            embeddings = self._used_embeddings(prompt, negative_prompt) if syntax == "a1111" else []
            self._seen[key] = (adapter_record(loras, weighted=True),
                               adapter_record(embeddings, weighted=False))
        return self._seen[key]

    def _lora(self, name: str, weight: float) -> dict[str, Any]:
        if name not in self._files:
            try:
                path = find_lora(name, self.lora_dirs)
                self._files[name] = describe_lora(path, name)
            except (NotFound, InvalidInput) as exc:
                raise ParamError("lora", str(exc).removeprefix("lora: ")) from None
        found = self._files[name]
        return {"name": name, "weight": weight, "sha256": found.sha256, "a1111": found.a1111_hash}

    def _used_embeddings(self, prompt: str, negative_prompt: str) -> list[dict[str, Any]]:
        if self.embeddings_dir is None:
            return []
        from sdq.sdmodel.prompts import embedding_names

        try:
            if self._embeddings is None:
                if self.tokenizer is None:
                    from sdq.sdmodel.tokenizer import prompt_tokenizer

                    self.tokenizer = prompt_tokenizer()
                self._embeddings = EmbeddingNames(self.embeddings_dir, self.tokenizer)
            names = dict.fromkeys(embedding_names(prompt, self.tokenizer, self._embeddings)
                                  + embedding_names(negative_prompt, self.tokenizer, self._embeddings))
            records = []
            for name in names:
                path = self._embeddings.path(name)
                if path not in self._hashes:
                    self._hashes[path] = file_sha256(path)
                records.append({"name": name, "sha256": self._hashes[path]})
        except InvalidInput as exc:
            raise ParamError("embeddings", str(exc)) from None
        return records


def adapter_finder(spec: JobSpec, lora_dirs: Sequence[Path | str] = (),
                   embeddings_dir: Path | str | None = None) -> AdapterFinder:
    """The finder of a job made as `spec` says: its own folders where it names them, else
    the given ones (the settings')."""
    return AdapterFinder(spec.lora_dirs or tuple(lora_dirs), spec.embeddings_dir or embeddings_dir,
                         spec.loras)


def with_folders(settings: Settings, lora_dirs: Sequence[Path | str] = (),
                 embeddings_dir: Path | str | None = None) -> Settings:
    """`settings` with the given LoRA and embeddings folders in place of SDQ_LORA_DIR and
    SDQ_EMBEDDINGS_DIR, where given: a command's options, or the folders a job or schedule
    recorded, so that a run here finds the files its items were resolved from."""
    return replace(settings, lora_dir=tuple(Path(d) for d in lora_dirs) or settings.lora_dir,
                   embeddings_dir=Path(embeddings_dir) if embeddings_dir else settings.embeddings_dir)
