"""From prompts to what the UNet attends to: chunks encoded by CLIP, weighted, joined.

A prompt read with the `a1111` syntax becomes one or more 77-token chunks (`prompts.py`); each
is encoded on its own, its vectors scaled by their emphasis weights and brought back to the
chunk's mean before weighting (A1111's "Original" emphasis), and the chunks are joined along
the token axis: 77 x chunks vectors per prompt. A `plain` prompt is today's single window, cut
after 75 tokens (with a `clip.PromptTruncated` warning), and its vectors are exactly those of
earlier sdq releases.

Everything is per prompt, never across a batch: A1111 takes the emphasis mean over its whole
batch, which equals this at batch size 1 (and for a batch of one prompt repeated), while here
an image never depends on its batch-mates.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor
from transformers import CLIPTextModel, CLIPTokenizer

from sdq.core.errors import InvalidInput

from . import clip
from .embeddings import EmbeddingRegistry
from .prompts import Chunk, prompt_chunks


class PromptText(NamedTuple):
    """One prompt as the text encoder needs it."""

    text: str
    syntax: str
    clip_skip: int


def emphasize(states: Tensor, weights: Tensor) -> Tensor:
    """One chunk's (77, width) states weighted per position, then rescaled to their mean
    before weighting: A1111's "Original" emphasis, on one image's chunk."""
    mean = states.mean()
    weighted = states * weights[:, None]
    return weighted * (mean / weighted.mean())


def _chunks(tokenizer: CLIPTokenizer, prompts: Sequence[PromptText],
            embeddings: EmbeddingRegistry | None) -> list[list[Chunk]]:
    plain = [p.text for p in prompts if p.syntax == "plain"]
    windows = iter(clip.tokenize(tokenizer, plain).tolist() if plain else [])
    return [[Chunk(tuple(next(windows)), (1.0,) * clip.MAX_LENGTH)] if p.syntax == "plain"
            else prompt_chunks(p.text, tokenizer, embeddings) for p in prompts]


def _ids(text_model: CLIPTextModel, chunks: Sequence[Chunk], embeddings: EmbeddingRegistry | None
         ) -> torch.LongTensor:
    """The chunks' ids, embedding positions pointing at their vectors' rows (`clip.TokenTable`)."""
    ids = torch.tensor([chunk.ids for chunk in chunks], dtype=torch.long)
    for row, chunk in enumerate(chunks):
        for position, name in chunk.embeddings:
            embedding = embeddings.get(name)
            rows = clip.token_table(text_model).rows(embedding.sha256, embedding.vectors)
            ids[row, position: position + len(rows)] = torch.tensor(rows)
    return ids


def _check_clip_skip(text_model: CLIPTextModel, prompts: Sequence[PromptText]) -> None:
    layers = text_model.config.num_hidden_layers
    for prompt in prompts:
        if not 1 <= prompt.clip_skip <= layers:
            raise InvalidInput(f"clip_skip: must be between 1 and {layers} (this model's text encoder "
                               f"layers), got {prompt.clip_skip}")


def encode_prompts(
    text_model: CLIPTextModel, tokenizer: CLIPTokenizer, prompts: Sequence[PromptText],
    device: torch.device | str, embeddings: EmbeddingRegistry | None = None,
) -> list[Tensor]:
    """Each prompt's (77 x chunks, width) states, float32 where emphasis applied.

    The chunks of all prompts with one clip skip are encoded in one batch, in prompt order, so
    a batch of plain prompts is encoded exactly as before. InvalidInput for a clip skip deeper
    than the model, an emphasis weight that is not a number, or an unusable embedding."""
    _check_clip_skip(text_model, prompts)
    chunks = _chunks(tokenizer, prompts, embeddings)
    rows = [(owner, chunk) for owner, owned in enumerate(chunks) for chunk in owned]
    states: list[Tensor] = [torch.empty(0)] * len(rows)
    for clip_skip in sorted({p.clip_skip for p in prompts}):
        picked = [k for k, (owner, _) in enumerate(rows) if prompts[owner].clip_skip == clip_skip]
        batch = [rows[k][1] for k in picked]
        encoded = clip.encode(text_model, _ids(text_model, batch, embeddings), device, clip_skip)
        for k, chunk, row in zip(picked, batch, encoded):
            weights = torch.tensor(chunk.weights, dtype=torch.float32, device=row.device)
            states[k] = emphasize(row.float(), weights) if chunk.weighted else row
    joined: list[list[Tensor]] = [[] for _ in prompts]
    for (owner, _), row in zip(rows, states):
        joined[owner].append(row)
    return [torch.cat(parts) for parts in joined]
