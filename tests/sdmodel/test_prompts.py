"""A1111's prompt rules on hand-computed tables: emphasis weights, BREAK, 75-token chunks, the
comma backtrack and embeddings that do not fit a chunk's remainder."""
from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence

import pytest

from sdq.core.errors import InvalidInput
from sdq.sdmodel.clip import load_tokenizer
from sdq.sdmodel.prompts import EmbeddingMatch, Part, parse_emphasis, prompt_chunks

R, S = 1.1, 1 / 1.1
BOS, EOS, COMMA = 49406, 49407, 267
CAT, DOG, FOX, A, RED = 2368, 1929, 3240, 320, 736


def parts(prompt: str) -> list[tuple[str, float]]:
    return [(p.text, p.weight) for p in parse_emphasis(prompt)]


@pytest.mark.parametrize(("prompt", "expected"), [
    ("a red fox", [("a red fox", 1.0)]),
    ("a (red) fox", [("a ", 1.0), ("red", R), (" fox", 1.0)]),
    ("((a))", [("a", R * R)]),
    ("(((a)))", [("a", R * R * R)]),
    ("[a]", [("a", S)]),
    ("[[a]]", [("a", S * S)]),
    ("(a:1.5)", [("a", 1.5)]),
    ("(a: 1.5 )", [("a", 1.5)]),
    ("(a:-0.5) b", [("a", -0.5), (" b", 1.0)]),
    ("((a:1.5))", [("a", 1.5 * R)]),
    ("x ((y:1.2) [z]) w", [("x ", 1.0), ("y", 1.2 * R), (" ", R), ("z w", 1.0)]),
    ("(a)(b)", [("ab", R)]),
    (r"\(a\) \[b\] c\\d", [("(a) [b] c\\d", 1.0)]),
    (r"(\(a\))", [("(a)", R)]),
    (r"a\b", [("ab", 1.0)]),
    ("(a [b", [("a ", R), ("b", R * S)]),
    ("((a) b", [("a", R * R), (" b", R)]),
    ("a) b] c", [("a) b] c", 1.0)]),
    ("[a)]", [("a)", S)]),
    ("a:1.2) b", [("a:1.2) b", 1.0)]),
    ("(a:b) c", [("a:b", R), (" c", 1.0)]),
    ("(a:1e3)", [("a:1e3", R)]),
    ("", [("", 1.0)]),
    ("()", [("", 1.0)]),
])
def test_emphasis_weights(prompt: str, expected: list[tuple[str, float]]) -> None:
    assert parts(prompt) == expected


def test_break_is_an_upper_case_word_outside_brackets() -> None:
    assert parts("a BREAK b") == [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]
    assert parts("a,BREAK,b") == [("a,", 1.0), ("BREAK", -1.0), (",b", 1.0)]
    assert parts("BREAK") == [("", 1.0), ("BREAK", -1.0), ("", 1.0)]
    assert parts("a break b BREAKS aBREAK") == [("a break b BREAKS aBREAK", 1.0)]
    assert all(p.is_break == (p.text == "BREAK") for p in parse_emphasis("a BREAK b BREAK c"))
    # A1111 multiplies the marker's weight like any part's: inside brackets it is the word.
    inside = parse_emphasis("(a BREAK b)")
    assert [(p.text, p.weight) for p in inside] == [("a", R), ("BREAK", -R), ("b", R)]
    assert not any(p.is_break for p in inside)


def test_a_weight_that_is_not_a_number_is_refused() -> None:
    with pytest.raises(InvalidInput, match=r"emphasis weight '1\.2\.3' in ':1\.2\.3\)' is not a number"):
        parse_emphasis("(a:1.2.3)")


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def chunk(tokens: Sequence[int], weights: Sequence[float] | None = None) -> tuple[list[int], list[float]]:
    """The ids and weights a chunk holding `tokens` must have: BOS, tokens, EOS padding, EOS."""
    pad = 75 - len(tokens)
    weights = [1.0] * len(tokens) if weights is None else list(weights)
    return [BOS, *tokens, *[EOS] * pad, EOS], [1.0, *weights, *[1.0] * pad, 1.0]


def table(tok, prompt: str, finder=None) -> list[tuple[list[int], list[float]]]:
    return [(list(c.ids), list(c.weights)) for c in prompt_chunks(prompt, tok, finder)]


def words(word: str, n: int) -> str:
    return " ".join([word] * n)


def test_plain_text_and_weights(tok) -> None:
    assert table(tok, "a red cat") == [chunk([A, RED, CAT])]
    assert table(tok, "a (red:1.5) [cat]") == [chunk([A, RED, CAT], [1.0, 1.5, S])]
    assert table(tok, "((a)), cat") == [chunk([A, COMMA, CAT], [R * R, 1.0, 1.0])]
    # Parts are tokenized apart: the brackets split "redcat" into two words.
    assert table(tok, "red(cat)") == [chunk([RED, CAT], [1.0, R])]
    assert table(tok, r"\(cat\)") == [chunk([263, CAT, 264])]


def test_empty_prompt_is_one_chunk_of_padding(tok) -> None:
    assert table(tok, "") == [chunk([])]
    assert table(tok, "()[]") == [chunk([])]


def test_long_prompts_fill_chunks_of_75(tok) -> None:
    assert table(tok, words("cat", 75)) == [chunk([CAT] * 75)]
    assert table(tok, words("cat", 76)) == [chunk([CAT] * 75), chunk([CAT])]
    assert table(tok, words("cat", 151)) == [chunk([CAT] * 75), chunk([CAT] * 75), chunk([CAT])]


def test_break_mid_chunk_and_at_a_chunk_edge(tok) -> None:
    assert table(tok, "a cat BREAK dog") == [chunk([A, CAT]), chunk([DOG])]
    assert table(tok, "a BREAK BREAK dog") == [chunk([A]), chunk([]), chunk([DOG])]
    assert table(tok, "BREAK dog") == [chunk([]), chunk([DOG])]
    assert table(tok, "dog BREAK") == [chunk([DOG])]
    # A full chunk is closed by the BREAK itself: no empty chunk between.
    assert table(tok, words("cat", 75) + " BREAK dog") == [chunk([CAT] * 75), chunk([DOG])]
    assert table(tok, words("cat", 76) + " BREAK dog") == [chunk([CAT] * 75), chunk([CAT]), chunk([DOG])]
    assert table(tok, "(cat BREAK dog)") == [chunk([CAT, 2568, DOG], [R, -R, R])]


def test_comma_backtrack(tok) -> None:
    # The comma is the 56th token: 20 from the chunk's end, so what follows it moves on.
    prompt = words("cat", 55) + ", " + words("dog", 19) + " fox"
    assert table(tok, prompt) == [chunk([CAT] * 55 + [COMMA]), chunk([DOG] * 19 + [FOX])]
    # The 55th: 21 from the end, too far back; the chunk is cut where it is full.
    prompt = words("cat", 54) + ", " + words("dog", 20) + " fox"
    assert table(tok, prompt) == [chunk([CAT] * 54 + [COMMA] + [DOG] * 20), chunk([FOX])]
    # Exactly 75 tokens: nothing overflows, so nothing moves.
    prompt = words("cat", 60) + ", " + words("dog", 14)
    assert table(tok, prompt) == [chunk([CAT] * 60 + [COMMA] + [DOG] * 14)]
    # The comma as the 75th token, or the 76th: the next chunk starts after it, or with it.
    assert table(tok, words("cat", 74) + ", fox") == [chunk([CAT] * 74 + [COMMA]), chunk([FOX])]
    assert table(tok, words("cat", 75) + ", fox") == [chunk([CAT] * 75), chunk([COMMA, FOX])]
    # Moved tokens keep their weights.
    prompt = words("cat", 60) + ", (" + words("dog", 14) + ") fox"
    assert table(tok, prompt) == [chunk([CAT] * 60 + [COMMA]), chunk([DOG] * 14 + [FOX], [R] * 14 + [1.0])]


class Finder:
    """Embeddings named by one token each, with the given vector counts."""

    def __init__(self, **vectors: int) -> None:
        self.names = {load_tokenizer()(name, add_special_tokens=False).input_ids[0]: (name, n)
                      for name, n in vectors.items()}

    def find(self, tokens: Sequence[int], position: int) -> EmbeddingMatch | None:
        found = self.names.get(tokens[position])
        return None if found is None else EmbeddingMatch(found[0], 1, found[1])


def test_embeddings_count_their_vectors_and_are_never_split(tok) -> None:
    finder = Finder(dog=3)
    chunks = prompt_chunks("a (dog) cat", tok, finder)
    assert [(list(c.ids), list(c.weights)) for c in chunks] == [chunk([A, 0, 0, 0, CAT], [1, R, R, R, 1])]
    assert chunks[0].embeddings == ((2, "dog"),)
    # 73 tokens leave 2 positions: the 3 vectors start the next chunk.
    chunks = prompt_chunks(words("cat", 73) + " dog cat", tok, finder)
    assert [list(c.ids) for c in chunks] == [chunk([CAT] * 73)[0], chunk([0, 0, 0, CAT])[0]]
    assert [c.embeddings for c in chunks] == [(), ((1, "dog"),)]
    # 72 leave 3: they fit exactly.
    chunks = prompt_chunks(words("cat", 72) + " dog cat", tok, finder)
    assert [list(c.ids) for c in chunks] == [chunk([CAT] * 72 + [0, 0, 0])[0], chunk([CAT])[0]]
    assert [c.embeddings for c in chunks] == [((73, "dog"),), ()]


def test_an_embedding_moved_by_the_comma_backtrack_stays_behind_as_a1111_keeps_it(tok) -> None:
    chunks = prompt_chunks(words("cat", 60) + ", dog " + words("red", 12) + " fox", tok, Finder(dog=3))
    assert [(list(c.ids), list(c.weights)) for c in chunks] == [
        chunk([CAT] * 60 + [COMMA]), chunk([0, 0, 0] + [RED] * 12 + [FOX])]
    assert [c.embeddings for c in chunks] == [((62, "dog"),), ()]


def test_parts_are_as_a1111_marks_them() -> None:
    assert Part("BREAK", -1.0).is_break and not Part("BREAK", 1.0).is_break


def test_reading_prompts_imports_no_torch() -> None:
    """Prompt files are checked by commands that must not pay for torch."""
    code = "import sys, sdq.sdmodel.prompts; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


def test_lora_tags_are_not_read_as_words(tok) -> None:
    """A1111 takes `<lora:...>` (any extra-network tag) out before parsing: the chunks are those
    of the prompt without it, emphasis around it included."""
    assert table(tok, "a (red:1.5) fox <lora:detail:0.8>, in snow <hypernet:x:1>") == \
        table(tok, "a (red:1.5) fox , in snow ")
