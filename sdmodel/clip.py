"""The CLIP ViT-L/14 text side of SD v1: prompts to ids (with `tokenizer`'s offline, torch-free
tokenizer) and a text encoder built from weights. The text encoder's architecture comes from a diffusers folder's `text_encoder/config.json` when there is
one, and from tensor shapes for single-file checkpoints, so a tiny random test model and the
real checkpoint go through the same code.
"""
from __future__ import annotations

import re
import warnings
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from huggingface_hub.errors import StrictDataclassError
from torch import Tensor, nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
from transformers.activations import ACT2FN

from .checkpoint import load_weights
from .modelfiles import CheckpointError
from .tokenizer import (  # noqa: F401 - the tokenizer's names, used with the encoder's
    BOS, CONTENT_LENGTH, EOS, MAX_LENGTH, PromptTruncated, _dropped, _prompt_tokens,
    dropped_text, vocabulary,
)

HEAD_DIM = 64
"""OpenAI's CLIP text towers use 64-channel heads: how a single file's head count is inferred."""


@lru_cache(maxsize=1)
def _shipped_tokenizer() -> CLIPTokenizer:
    """transformers' CLIPTokenizer on the shipped vocabulary (`tokenizer.vocabulary`)."""
    vocab, merges = vocabulary()
    return CLIPTokenizer(vocab=vocab, merges=merges, bos_token=BOS, eos_token=EOS, pad_token=EOS,
                         unk_token=EOS, model_max_length=MAX_LENGTH)


def load_tokenizer(path: str | Path | None = None) -> CLIPTokenizer:
    """The ViT-L/14 tokenizer from shipped data, or a diffusers `tokenizer/` folder's own.

    A folder wins when given because other SD families ship other pad tokens and vocabularies;
    one that pads prompts to another length than SD v1's 77 tokens is refused.
    """
    if path is None:
        return _shipped_tokenizer()
    tokenizer = CLIPTokenizer.from_pretrained(Path(path), local_files_only=True)
    if tokenizer.model_max_length != MAX_LENGTH:
        raise CheckpointError(Path(path) / "tokenizer_config.json",
                              f"model_max_length = {tokenizer.model_max_length}: sdq's prompts are {MAX_LENGTH} tokens")
    return tokenizer


def tokenize(tokenizer: CLIPTokenizer, prompts: Sequence[str]) -> torch.LongTensor:
    """(B, 77) ids the way diffusers' SD pipeline makes them: padded, truncated to 75 + BOS/EOS.

    Assembled by hand from one untruncated pass so that truncation can be reported with the
    dropped words without tokenizing each prompt twice.
    """
    ids = torch.full((len(prompts), MAX_LENGTH), tokenizer.pad_token_id, dtype=torch.long)
    for row, (prompt, (content, offsets)) in enumerate(zip(prompts, _prompt_tokens(tokenizer, prompts))):
        kept = [tokenizer.bos_token_id, *content[:CONTENT_LENGTH], tokenizer.eos_token_id]
        ids[row, : len(kept)] = torch.tensor(kept)
        if (dropped := _dropped(prompt, offsets)) is not None:
            warnings.warn(PromptTruncated(prompt, dropped), stacklevel=2)
    return ids


def _text_model_prefix(state_dict: Mapping[str, Tensor], prefix: str) -> str:
    """Where the text tower's keys start: checkpoints say `text_model.`, transformers 5 does not."""
    for base in (f"{prefix}text_model.", prefix):
        if f"{base}embeddings.token_embedding.weight" in state_dict:
            return base
    raise ValueError(
        f"no CLIP text encoder in these weights: expected {prefix}text_model.embeddings.token_embedding.weight"
    )


def text_config_from_state_dict(state_dict: Mapping[str, Tensor], prefix: str = "") -> CLIPTextConfig:
    """Infer the text encoder's shape from its tensors, so any size of ViT-L/14-style tower loads."""
    base = _text_model_prefix(state_dict, prefix)
    vocab_size, hidden_size = state_dict[f"{base}embeddings.token_embedding.weight"].shape
    if hidden_size % HEAD_DIM:
        raise ValueError(
            f"CLIP text encoder width {hidden_size} is not a multiple of {HEAD_DIM}, "
            f"so its attention heads cannot be inferred (CLIP uses {HEAD_DIM}-channel heads)"
        )
    layer_key = re.compile(re.escape(base) + r"encoder\.layers\.(\d+)\.")
    layers = {int(m.group(1)) for key in state_dict if (m := layer_key.match(key))}
    if not layers:
        raise ValueError(f"no CLIP text encoder layers under {base}encoder.layers")
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=state_dict[f"{base}encoder.layers.0.mlp.fc1.weight"].shape[0],
        projection_dim=hidden_size,
        num_hidden_layers=max(layers) + 1,  # a gap then fails loudly as missing keys on load
        num_attention_heads=hidden_size // HEAD_DIM,
        max_position_embeddings=state_dict[f"{base}embeddings.position_embedding.weight"].shape[0],
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=1,
    )


def text_config_from_diffusers(cfg: Mapping[str, Any]) -> CLIPTextConfig:
    """A folder's `text_encoder/config.json` as transformers reads it, heads and all.

    ValueError names what sdq cannot run: another model type, a projection head, fewer positions
    than the 77 tokens every prompt is padded to, an activation transformers does not know, and
    what transformers' own validation refuses (heads that do not divide the width, wrong types).
    """
    problems = []
    if cfg.get("model_type", "clip_text_model") != "clip_text_model":
        problems.append(f"model_type = {cfg['model_type']!r}: a CLIP text tower ('clip_text_model') expected")
    if cfg.get("architectures", ["CLIPTextModel"]) != ["CLIPTextModel"]:
        problems.append(f"architectures = {cfg['architectures']}: sdq conditions on CLIPTextModel's hidden states")
    try:
        config = CLIPTextConfig.from_dict(dict(cfg))
    except StrictDataclassError as exc:  # transformers checks types and the heads against the width
        raise ValueError("; ".join([*problems, str(exc.__cause__ or exc)])) from None
    if config.max_position_embeddings < MAX_LENGTH:
        problems.append(f"max_position_embeddings = {config.max_position_embeddings}: prompts are {MAX_LENGTH} tokens")
    if config.hidden_act not in ACT2FN:
        problems.append(f"hidden_act = {config.hidden_act!r}: unknown activation")
    if problems:
        raise ValueError("; ".join(problems))
    return config


def load_text_encoder(
    weights: Mapping[str, Tensor], source: Path | str, config: CLIPTextConfig | None = None, *, prefix: str = "",
) -> CLIPTextModel:
    """The text encoder under `prefix` in `weights`, inference-ready, as CheckpointError or a model.

    `config` is a folder's; without one (single files) the architecture is inferred from the
    shapes. Built on the meta device and given the tensors themselves, which skips seconds of
    random init and a copy. Checkpoints say `text_model.embeddings...` and older ones carry a
    stale `position_ids`; transformers 5's CLIPTextModel has neither, so keys follow the module
    and the position ids (a buffer no file needs to hold) are made here.
    """
    try:
        base = _text_model_prefix(weights, prefix)
        if config is None:
            config = text_config_from_state_dict(weights, prefix)
    except ValueError as exc:
        raise CheckpointError(source, str(exc)) from None
    except KeyError as exc:
        raise CheckpointError(source, f"missing weights: {exc.args[0]}") from None
    tensors = {
        key[len(prefix):].removeprefix("text_model."): tensor
        for key, tensor in weights.items()
        if key.startswith(prefix) and not key.endswith("position_ids")
    }
    with torch.device("meta"):
        model = CLIPTextModel._from_config(config, attn_implementation="sdpa")
    load_weights(model, tensors, source, base)
    model.embeddings.position_ids = torch.arange(config.max_position_embeddings)[None]
    return model.eval().requires_grad_(False)


def encode(
    text_model: CLIPTextModel, input_ids: torch.LongTensor, device: torch.device | str, clip_skip: int = 1,
) -> Tensor:
    """The (B, 77, hidden) states SD v1 conditions on: no attention mask, as in SD1.5.

    `clip_skip` counts as A1111 does: 1 is the last layer's output (after the final layer
    norm, as always); N > 1 is the output of the N-th layer from the end, through the final
    layer norm too (diffusers' `clip_skip` = N - 1)."""
    with torch.inference_mode():
        ids = input_ids.to(device)
        if clip_skip == 1:
            return text_model(ids).last_hidden_state
        hidden = text_model(ids, output_hidden_states=True).hidden_states[-clip_skip]
        return text_model.final_layer_norm(hidden)


class TokenTable(nn.Embedding):
    """CLIP's token embedding, and past its vocabulary, rows holding textual-inversion vectors.

    An embedding's vectors enter the text encoder as ids of their own, so prompts with
    embeddings go through the model's own forward pass like any other. The vocabulary's rows
    are the original weight itself (not a copy), so the model's state dict is unchanged; the
    added rows are a buffer that follows the model's device and dtype, one block per file
    content (sha256), added once and kept: a folder's worth of vectors is a few megabytes.
    """

    def __init__(self, vocabulary: nn.Embedding) -> None:
        super().__init__(vocabulary.num_embeddings, vocabulary.embedding_dim, device="meta")
        self.weight = vocabulary.weight
        self.register_buffer("extra", vocabulary.weight.new_empty(0, self.embedding_dim), persistent=False)
        self.first_ids: dict[str, int] = {}

    def rows(self, key: str, vectors: Tensor) -> range:
        """The ids of `vectors` (added under `key` the first time)."""
        if key not in self.first_ids:
            self.first_ids[key] = self.num_embeddings + len(self.extra)
            self.extra = torch.cat([self.extra, vectors.to(self.extra)])
        first = self.first_ids[key]
        return range(first, first + len(vectors))

    def forward(self, ids: Tensor) -> Tensor:
        added = ids >= self.num_embeddings
        if not added.any():
            return super().forward(ids)
        out = super().forward(ids.masked_fill(added, 0))
        out[added] = self.extra[ids[added] - self.num_embeddings]
        return out


def token_table(text_model: CLIPTextModel) -> TokenTable:
    """The text model's `TokenTable`, put in place of its token embedding on first use."""
    table = text_model.get_input_embeddings()
    if not isinstance(table, TokenTable):
        table = TokenTable(table)
        text_model.set_input_embeddings(table)
    return table
