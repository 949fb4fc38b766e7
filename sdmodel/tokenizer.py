"""SD v1's CLIP tokenizer for reading prompts, without torch or transformers.

Planning a job reads its prompts (the embeddings they name, what a `plain` prompt loses past
75 tokens), and a command that only plans imports neither torch nor transformers. So the
vocabulary is rebuilt here from OpenAI's BPE merges shipped with the package (no model hub:
the ids openai/clip-vit-large-patch14 gives) and served by the `tokenizers` library directly,
with the normalizer and pre-tokenizer transformers' CLIPTokenizer sets up on the same library
(a test compares the two). The pipeline's own tokenizer (`clip.load_tokenizer`) is
transformers' CLIPTokenizer on this vocabulary, or a model folder's.
"""
from __future__ import annotations

import gzip
from collections.abc import Sequence
from functools import lru_cache
from importlib import resources
from typing import Any

from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import BPE

MAX_LENGTH = 77
"""Token positions of SD v1's text encoder: BOS, up to 75 prompt tokens, EOS, then padding."""
CONTENT_LENGTH = MAX_LENGTH - 2
BOS, EOS = "<|startoftext|>", "<|endoftext|>"

_BPE_DATA = "clip_bpe_16e6.txt.gz"
_N_MERGES = 49152 - 256 - 2
"""OpenAI keeps only this many merges, so that byte symbols + merges + 2 specials make 49408."""


class PromptTruncated(UserWarning):
    """A prompt overflowed the 77-token window: its tail cannot influence the image.

    Warned rather than raised because SD has always silently truncated and users rely on it;
    the dropped words are carried so a job report can show exactly what was lost.
    """

    def __init__(self, prompt: str, dropped: str) -> None:
        # Both fields as args (not a formatted message) so the warning pickles across processes.
        super().__init__(prompt, dropped)
        self.prompt = prompt
        self.dropped = dropped

    def __str__(self) -> str:
        return f"prompt longer than {CONTENT_LENGTH} CLIP tokens; dropped: {self.dropped!r}"


def _byte_symbols() -> list[str]:
    """OpenAI's printable stand-ins for the 256 bytes, in the order that fixes ids 0-255."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols = {byte: chr(byte) for byte in printable}
    for n, byte in enumerate(b for b in range(256) if b not in symbols):
        symbols[byte] = chr(256 + n)
    return list(symbols.values())


@lru_cache(maxsize=1)
def vocabulary() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Ids and merges exactly as OpenAI's simple_tokenizer builds them; cached as it takes ~0.2 s."""
    packed = (resources.files(__package__) / "data" / _BPE_DATA).read_bytes()
    lines = gzip.decompress(packed).decode("utf-8").split("\n")
    merges = [(a, b) for a, b in (line.split() for line in lines[1 : 1 + _N_MERGES])]  # 0: header
    symbols = _byte_symbols()
    tokens = [*symbols, *(s + "</w>" for s in symbols), *("".join(m) for m in merges), BOS, EOS]
    return {token: i for i, token in enumerate(tokens)}, merges


_WORDS = (r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]"
          r"|[^\s\p{L}\p{N}]+")
"""CLIP's word pattern (simple_tokenizer's), each match a word the BPE then splits."""


class PromptTokenizer:
    """The shipped vocabulary on the `tokenizers` library, behind the part of transformers'
    tokenizer interface that reading prompts uses (`sdmodel.prompts`, `embedding_files`)."""

    def __init__(self) -> None:
        vocab, merges = vocabulary()
        backend = Tokenizer(BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                                end_of_word_suffix="</w>", fuse_unk=False, unk_token=EOS))
        backend.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(_WORDS), behavior="removed", invert=True),
             pre_tokenizers.ByteLevel(add_prefix_space=False)])
        backend.add_special_tokens([BOS, EOS])
        self.backend = backend
        self.bos_token_id, self.eos_token_id = vocab[BOS], vocab[EOS]
        self.pad_token_id = self.unk_token_id = self.eos_token_id

    def __call__(self, texts: Sequence[str], *, add_special_tokens: bool = False,
                 return_offsets_mapping: bool = False, verbose: bool = False) -> dict[str, Any]:
        """Ids (and character offsets) of each text, without BOS/EOS: prompts are framed by
        their chunks, never by the tokenizer."""
        if add_special_tokens:
            raise ValueError("prompts are tokenized without BOS/EOS; chunks add them")
        encodings = self.backend.encode_batch(list(texts), add_special_tokens=False)
        batch: dict[str, Any] = {"input_ids": [e.ids for e in encodings]}
        if return_offsets_mapping:
            batch["offset_mapping"] = [e.offsets for e in encodings]
        return batch

    def convert_tokens_to_ids(self, token: str) -> int:
        found = self.backend.token_to_id(token)
        return self.unk_token_id if found is None else found


@lru_cache(maxsize=1)
def prompt_tokenizer() -> PromptTokenizer:
    """The one tokenizer planning needs, built once per process."""
    return PromptTokenizer()


def _prompt_tokens(tokenizer: Any, prompts: Sequence[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
    """Untruncated ids and character offsets: one pass gives both the ids and what gets cut."""
    if not prompts:
        return []
    # verbose=False: overlong prompts are reported as PromptTruncated, not as a transformers log line.
    batch = tokenizer(list(prompts), add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    return list(zip(batch["input_ids"], batch["offset_mapping"]))


def _dropped(prompt: str, offsets: list[tuple[int, int]]) -> str | None:
    """The user's own text past the window, sliced from the prompt rather than decoded.

    Decoding would lowercase and re-space punctuation; the original words are what a user
    recognises in a report. A word split by the cut is reported from the cut on.
    """
    if len(offsets) <= CONTENT_LENGTH:
        return None
    return prompt[offsets[CONTENT_LENGTH][0] :].strip()


def dropped_text(tokenizer: Any, prompt: str) -> str | None:
    """What truncation would drop from `prompt`, or None; lets validators warn before queueing."""
    ((_, offsets),) = _prompt_tokens(tokenizer, [prompt])
    return _dropped(prompt, offsets)
