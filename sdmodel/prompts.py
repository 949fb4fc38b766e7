"""Prompts as AUTOMATIC1111's web UI reads them: "Original" emphasis, BREAK and 75-token chunks.

Community prompt files are written for A1111 and its infotext is read back by every SD tool, so
sdq follows its rules to the edge cases, quirks included (each one is named where it is kept):

- `(text)` multiplies the weight of its text by 1.1, `[text]` divides it by 1.1, `(text:w)`
  multiplies it by w; nesting multiplies; `\\(` `\\)` `\\[` `\\]` `\\\\` are the characters
  themselves; brackets left open are closed at the end of the prompt; a closing bracket with
  nothing open is text. Adjacent parts of equal weight are merged before tokenizing.
- `BREAK` (upper case, a word of its own) ends the current chunk.
- Each part is tokenized on its own and the tokens are packed into chunks of 75; a chunk that
  fills up with a comma among its last 20 tokens moves what follows that comma to the next
  chunk. A textual-inversion embedding's vectors are never split across chunks.
- A chunk is `[BOS] + 75 tokens, padded with EOS + [EOS]`, with one weight per position (1.0
  for BOS, EOS and padding).

Nothing here imports torch: the tokenizer is any callable with the `transformers` interface, and
embeddings are looked up through `EmbeddingFinder`, so prompt files can be checked cheaply.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

from sdq.core.errors import InvalidInput
from sdq.core.loratags import strip_tags

ROUND_BRACKET = 1.1
SQUARE_BRACKET = 1 / 1.1
CHUNK_TOKENS = 75
"""Prompt tokens per chunk: CLIP's 77 positions less BOS and EOS."""
COMMA_BACKTRACK = 20
"""A1111's default `comma_padding_backtrack`: how far back a full chunk looks for a comma."""
COMMA = ",</w>"
PLACEHOLDER = 0
"""The id A1111 writes where an embedding's vectors go (CLIP's "!" token): it shows through
only where A1111's comma backtrack moves an embedding (see `_Packer.backtrack`)."""

_SYNTAX = re.compile(r"""
      \\(?P<escaped>[()\[\]\\])                # \( \) \[ \] \\ : the character itself
    | (?P<backslash>\\)                        # any other backslash: dropped
    | (?P<open>[(\[])
    | :\s*(?P<weight>[+-]?[.\d]+)\s*\)         # (text:1.3)
    | (?P<close>[)\]])
    | (?P<text>[^\\()\[\]:]+)
    | (?P<colon>:)
""", re.VERBOSE)
_BREAK = re.compile(r"\s*\bBREAK\b\s*")


@dataclass(frozen=True)
class Part:
    """A run of prompt text and its emphasis weight."""

    text: str
    weight: float

    @property
    def is_break(self) -> bool:
        """A1111 marks BREAK as the text "BREAK" with weight -1 and recognises it only as such:
        a BREAK inside brackets has its weight multiplied and is then read as the word "break"
        with a negative weight (kept, as A1111 makes that image)."""
        return self.text == "BREAK" and self.weight == -1


def _text_parts(text: str) -> list[Part]:
    pieces = _BREAK.split(text)
    parts = [Part(pieces[0], 1.0)]
    for piece in pieces[1:]:
        parts += [Part("BREAK", -1.0), Part(piece, 1.0)]
    return parts


def parse_emphasis(prompt: str) -> list[Part]:
    """The weighted parts of `prompt`, BREAK markers included; one empty part for an empty one.

    Weights multiply in the order brackets close (then open round brackets, then open square
    ones, outermost first), which fixes the float values A1111 gets, e.g. ((a)) = 1.1 * 1.1.
    """
    parts: list[list[Any]] = []
    open_round: list[int] = []
    open_square: list[int] = []

    def scale(start: int, factor: float) -> None:
        for part in parts[start:]:
            part[1] *= factor

    for match in _SYNTAX.finditer(prompt):
        kind, value = match.lastgroup, match.group(match.lastgroup)
        if kind == "escaped":
            parts.append([value, 1.0])
        elif kind == "backslash":
            parts.append(["", 1.0])
        elif kind == "open":
            (open_round if value == "(" else open_square).append(len(parts))
        elif kind == "weight" and open_round:
            try:
                factor = float(value)
            except ValueError:
                raise InvalidInput(f"emphasis weight {value!r} in {match.group()!r} is not a number") from None
            scale(open_round.pop(), factor)
        elif kind == "close" and value == ")" and open_round:
            scale(open_round.pop(), ROUND_BRACKET)
        elif kind == "close" and value == "]" and open_square:
            scale(open_square.pop(), SQUARE_BRACKET)
        else:
            parts += [[p.text, p.weight] for p in _text_parts(match.group())]
    for start in open_round:
        scale(start, ROUND_BRACKET)
    for start in open_square:
        scale(start, SQUARE_BRACKET)

    merged: list[Part] = []
    for text, weight in parts or [["", 1.0]]:
        if merged and merged[-1].weight == weight:
            merged[-1] = Part(merged[-1].text + text, weight)
        else:
            merged.append(Part(text, weight))
    return merged


class EmbeddingMatch(NamedTuple):
    """An embedding named at a position of a part's tokens."""

    name: str
    span: int
    """How many of the prompt's tokens its name takes."""
    vectors: int
    """How many token positions its vectors take instead."""


class NameMatcher(Protocol):
    def match(self, tokens: Sequence[int], position: int) -> tuple[str, int] | None:
        """(name, tokens its name takes) of the embedding named at `tokens[position]`, the
        longest name first; None when none is."""


class EmbeddingFinder(Protocol):
    def find(self, tokens: Sequence[int], position: int) -> EmbeddingMatch | None:
        """The embedding whose name's tokens start at `tokens[position]`, longest name first."""


@dataclass(frozen=True)
class Chunk:
    """One 77-position window of a prompt, encoded by CLIP on its own."""

    ids: tuple[int, ...]
    weights: tuple[float, ...]
    embeddings: tuple[tuple[int, str], ...] = ()
    """(position in `ids`, name): where each embedding's vectors replace the ids."""

    @property
    def weighted(self) -> bool:
        return any(w != 1.0 for w in self.weights)


@dataclass
class _Packer:
    """Fills chunks token by token; `close` pads one and starts the next."""

    bos: int
    eos: int
    comma: int | None
    chunks: list[Chunk] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    embeddings: list[tuple[int, str]] = field(default_factory=list)
    last_comma: int = -1

    @property
    def full(self) -> bool:
        return len(self.ids) == CHUNK_TOKENS

    def close(self) -> None:
        pad = CHUNK_TOKENS - len(self.ids)
        self.chunks.append(Chunk(
            (self.bos, *self.ids, *[self.eos] * pad, self.eos),
            (1.0, *self.weights, *[1.0] * pad, 1.0),
            tuple(self.embeddings),
        ))
        self.ids, self.weights, self.embeddings, self.last_comma = [], [], [], -1

    def backtrack(self) -> None:
        """Move what follows the chunk's last comma to a new chunk.

        As in A1111, the moved positions keep their ids and weights but an embedding among
        them stays behind: its vectors fill the padding of the old chunk where they were, and
        the new chunk reads the placeholder id there."""
        cut = self.last_comma + 1
        moved = self.ids[cut:], self.weights[cut:]
        del self.ids[cut:], self.weights[cut:]
        self.close()
        self.ids, self.weights = list(moved[0]), list(moved[1])

    def add(self, tokens: Sequence[int], weight: float, finder: EmbeddingFinder | None) -> None:
        position = 0
        while position < len(tokens):
            token = tokens[position]
            if token == self.comma:
                self.last_comma = len(self.ids)
            elif self.full and self.last_comma != -1 and CHUNK_TOKENS - self.last_comma <= COMMA_BACKTRACK:
                self.backtrack()
            if self.full:
                self.close()
            match = finder.find(tokens, position) if finder is not None else None
            if match is None:
                self.ids.append(token)
                self.weights.append(weight)
                position += 1
                continue
            if len(self.ids) + match.vectors > CHUNK_TOKENS:
                self.close()
            self.embeddings.append((len(self.ids) + 1, match.name))
            self.ids += [PLACEHOLDER] * match.vectors
            self.weights += [weight] * match.vectors
            position += match.span


def pack_chunks(
    tokenized: Sequence[tuple[Sequence[int], Part]], *, bos: int, eos: int, comma: int | None,
    finder: EmbeddingFinder | None = None,
) -> list[Chunk]:
    """Chunks of the (tokens, part) pairs of a parsed prompt; at least one, empty or not."""
    packer = _Packer(bos, eos, comma)
    for tokens, part in tokenized:
        if part.is_break:
            packer.close()
        else:
            packer.add(tokens, part.weight, finder)
    if packer.ids or not packer.chunks:
        packer.close()
    return packer.chunks


def comma_id(tokenizer: Any) -> int | None:
    """The id of a word-final comma, or None for a vocabulary without one."""
    found = tokenizer.convert_tokens_to_ids(COMMA)
    return None if found == tokenizer.unk_token_id else found


def prompt_chunks(prompt: str, tokenizer: Any, finder: EmbeddingFinder | None = None) -> list[Chunk]:
    """`prompt` read as A1111 reads it, in chunks ready for CLIP. InvalidInput for a weight
    that is not a number (A1111 fails on it too)."""
    tokenized = _tokenized(prompt, tokenizer)
    return pack_chunks(tokenized, bos=tokenizer.bos_token_id, eos=tokenizer.eos_token_id,
                       comma=comma_id(tokenizer), finder=finder)


def _tokenized(prompt: str, tokenizer: Any) -> list[tuple[Sequence[int], Part]]:
    """Each weighted part of `prompt` with its tokens; extra-network tags (`<lora:...>`) are
    taken out first, as A1111 does, so they are never read as words."""
    parts = parse_emphasis(strip_tags(prompt))
    # verbose=False: a long part is no mistake here, it is what chunks are for.
    ids = tokenizer([p.text for p in parts], add_special_tokens=False, verbose=False)["input_ids"]
    return list(zip(ids, parts))


def embedding_names(prompt: str, tokenizer: Any, matcher: NameMatcher) -> list[str]:
    """The embeddings `prompt` names when read with the `a1111` syntax, in order of first use:
    the tokens of each part scanned as `pack_chunks` scans them (a name found, its tokens
    skipped), without reading any embedding file."""
    used: dict[str, None] = {}
    for tokens, part in _tokenized(prompt, tokenizer):
        position = 0
        while not part.is_break and position < len(tokens):
            found = matcher.match(tokens, position)
            if found is None:
                position += 1
                continue
            used[found[0]] = None
            position += found[1]
    return list(used)
