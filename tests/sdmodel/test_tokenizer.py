"""The planning tokenizer (`tokenizers` alone) reads prompts as the pipeline's CLIPTokenizer does.

Submit finds the embeddings a prompt names, and the words a `plain` prompt loses past 75 tokens,
with `tokenizer.PromptTokenizer`; the worker encodes with transformers' CLIPTokenizer. If they
split a prompt differently, a submit would record one set of embeddings and the worker use
another, so they are compared here on what varies in real prompts."""
from __future__ import annotations

import json

import pytest

from sdq.sdmodel.clip import load_tokenizer
from sdq.sdmodel.tokenizer import PromptTokenizer, dropped_text

PROMPTS = [
    "", " ", "a red fox", "A  RED\tfox\n in the SNOW", "(red:1.5) fox, ((snow)), [blurry]",
    "easynegative, bad-hands-5, lowres", "don't, it's, we'll, they've, I'm, you'd, we're",
    "1girl, 8k uhd, 35mm f/1.8", "café crème brûlée", "Ｆｕｌｌｗｉｄｔｈ ｔｅｘｔ", "東京の夜景",
    "emoji 🦊🌲 fox", "<|endoftext|> and <|startoftext|> in text", "a\u00a0non-breaking space",
    "e\u0301 combining accent", "word" * 40, ", ".join(["masterpiece", "best quality"] * 30),
    "\\(escaped\\) brackets \\[too\\]", "BREAK a fox BREAK a hen", "<lora:detail:0.8> tag",
]


@pytest.fixture(scope="module")
def both() -> tuple[PromptTokenizer, object]:
    return PromptTokenizer(), load_tokenizer()


def test_the_backends_are_configured_alike(both) -> None:
    mine, theirs = both
    ours, reference = (json.loads(t.to_str()) for t in (mine.backend, theirs.backend_tokenizer))
    for part in ("normalizer", "pre_tokenizer", "model", "added_tokens"):
        assert ours[part] == reference[part], part


@pytest.mark.parametrize("prompt", PROMPTS)
def test_ids_and_offsets_match_transformers(both, prompt: str) -> None:
    mine, theirs = both
    kwargs = {"add_special_tokens": False, "return_offsets_mapping": True, "verbose": False}
    got, expected = mine([prompt], **kwargs), theirs([prompt], **kwargs)
    assert got["input_ids"] == expected["input_ids"]
    assert [list(map(tuple, o)) for o in got["offset_mapping"]] == [
        list(map(tuple, o)) for o in expected["offset_mapping"]]
    assert dropped_text(mine, prompt) == dropped_text(theirs, prompt)


def test_special_ids_and_unknown_tokens_match(both) -> None:
    mine, theirs = both
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        assert getattr(mine, name) == getattr(theirs, name), name
    for token in (",</w>", "fox</w>", "no-such-token"):
        assert mine.convert_tokens_to_ids(token) == theirs.convert_tokens_to_ids(token)
