"""CLIP text side: ids equal to openai/clip-vit-large-patch14's, and a text encoder from weights.

Ids are checked three ways that do not share code with sdq.sdmodel.clip: published ids, the same
vocabulary written as the hub's vocab.json/merges.txt and loaded by transformers, and a pure
Python re-implementation of OpenAI's simple_tokenizer BPE.
"""
from __future__ import annotations

import gzip
import json
import math
import unicodedata
import warnings
from importlib import resources
from pathlib import Path

import pytest
import regex
import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from sdq.sdmodel.modelfiles import CheckpointError
from sdq.sdmodel.clip import (
    PromptTruncated,
    dropped_text,
    encode,
    load_text_encoder,
    load_tokenizer,
    text_config_from_state_dict,
    tokenize,
)

TRICKY_PROMPTS = [
    "a photograph of an astronaut riding a horse",
    "  Extra   whitespace\tand\nnewlines  ",
    "MiXeD CaSe WoRdS, ALL CAPS, lowercase",
    "it's a dog's life, isn't it? they'll've we'd I'm you're",
    "\"double quotes\" and 'single' and “curly” ‘quotes’ «guillemets»",
    "café naïve résumé Ångström straße ÉCOLE",
    "decomposed cafe\u0301 becomes composed",
    "emoji 🚀🔥👩‍🚀 and a flag 🇯🇵",
    "日本語のプロンプト, 中文提示, русский, العربية, हिन्दी",
    "numbers 1234567890 3.14 1,000,000 2nd 4k 8K UHD 1920x1080",
    "punctuation!!! ... ??? (parens) [brackets] {braces} <angle> @#$%^&*_+=|\\/~`",
    "(masterpiece:1.2), [[bad hands]], --ar 16:9",
    "<|startoftext|> literal specials <|endoftext|>",
    "",
]


@pytest.fixture(scope="module")
def openai_tables() -> tuple[list[str], list[tuple[str, str]], dict[int, str]]:
    """Vocabulary and merges derived as OpenAI's simple_tokenizer.py derives them."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    byte_encoder = dict(zip(bs, map(chr, cs)))
    data = resources.files("sdq.sdmodel") / "data" / "clip_bpe_16e6.txt.gz"
    merges = gzip.decompress(data.read_bytes()).decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    merges = [tuple(m.split()) for m in merges]
    vocab = list(byte_encoder.values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    return vocab, merges, byte_encoder


def openai_ids(text: str, vocab: list[str], merges: list[tuple[str, str]], byte_encoder: dict[int, str]) -> list[int]:
    """OpenAI's simple_tokenizer encode(), minus its ftfy/html clean-up (HF's tokenizer has none)."""
    encoder = {t: i for i, t in enumerate(vocab)}
    ranks = {m: i for i, m in enumerate(merges)}
    pattern = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
    text = regex.sub(r"\s+", " ", unicodedata.normalize("NFC", text)).strip().lower()
    ids = []
    for piece in regex.findall(pattern, text, regex.IGNORECASE):
        if piece in ("<|startoftext|>", "<|endoftext|>"):
            ids.append(encoder[piece])
            continue
        word = [byte_encoder[b] for b in piece.encode("utf-8")]
        word[-1] += "</w>"
        while len(word) > 1:
            best = min(zip(word, word[1:]), key=lambda pair: ranks.get(pair, math.inf))
            if best not in ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        ids += [encoder[t] for t in word]
    return [49406, *ids, 49407]


def test_published_ids_and_padding() -> None:
    tok = load_tokenizer()
    prompt = "a photograph of an astronaut riding a horse"
    published = [49406, 320, 8853, 539, 550, 18376, 6765, 320, 4558, 49407]
    assert tok(prompt).input_ids == published
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    ids = tokenize(tok, [prompt])
    assert ids.dtype == torch.long and ids.shape == (1, 77)
    assert ids[0].tolist() == published + [49407] * (77 - len(published))


def test_vocabulary_and_special_tokens() -> None:
    tok = load_tokenizer()
    assert len(tok) == 49408
    assert tok.convert_tokens_to_ids(["<|startoftext|>", "<|endoftext|>"]) == [49406, 49407]
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (49406, 49407, 49407)
    assert tok.pad_token == "<|endoftext|>"
    assert tok.model_max_length == 77
    assert load_tokenizer() is tok


def test_ids_agree_with_hub_files_saved_copy_and_openai_bpe(tmp_path: Path, openai_tables) -> None:
    vocab, merges, byte_encoder = openai_tables
    hub = tmp_path / "hub"
    hub.mkdir()
    (hub / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False), "utf-8")
    (hub / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", "utf-8")
    from_hub_files = CLIPTokenizer.from_pretrained(hub, local_files_only=True)
    load_tokenizer().save_pretrained(tmp_path / "saved")
    saved = load_tokenizer(tmp_path / "saved")
    for prompt in TRICKY_PROMPTS:
        ours = load_tokenizer()(prompt).input_ids
        assert ours == from_hub_files(prompt).input_ids, prompt
        assert ours == saved(prompt).input_ids, prompt
        assert ours == openai_ids(prompt, vocab, merges, byte_encoder), prompt


def test_tokenize_matches_diffusers_call_on_a_batch() -> None:
    tok = load_tokenizer()
    prompts = [*TRICKY_PROMPTS, "a cat " * 60]
    with pytest.warns(PromptTruncated):
        ours = tokenize(tok, prompts)
    theirs = tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(ours, theirs)
    assert tokenize(tok, []).shape == (0, 77)


def test_truncation_warns_with_the_dropped_words() -> None:
    tok = load_tokenizer()
    fits = " ".join(["cat"] * 75)
    overflows = " ".join(["cat"] * 74) + " Dog,  riding a HORSE!"
    with warnings.catch_warnings():
        warnings.simplefilter("error", PromptTruncated)
        assert tokenize(tok, [fits])[0, 76].item() == 49407
    assert dropped_text(tok, fits) is None

    with pytest.warns(PromptTruncated) as record:
        ids = tokenize(tok, [fits, overflows])
    (warning,) = record
    assert warning.message.prompt == overflows
    assert warning.message.dropped == ",  riding a HORSE!"
    assert "riding a HORSE" in str(warning.message)
    assert dropped_text(tok, overflows) == ",  riding a HORSE!"
    cat, dog = tok.convert_tokens_to_ids(["cat</w>", "dog</w>"])
    assert ids[1].tolist() == [49406] + [cat] * 74 + [dog, 49407]


@pytest.fixture(scope="module")
def tiny_text_model() -> CLIPTextModel:
    torch.manual_seed(0)
    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=1,
        max_position_embeddings=77,
    )
    return CLIPTextModel(config).eval()


def test_config_round_trips_and_loaded_model_matches(tiny_text_model: CLIPTextModel) -> None:
    original = tiny_text_model.config
    state = tiny_text_model.state_dict()
    prefix = "cond_stage_model.transformer."
    checkpoint = {f"{prefix}text_model.{k}": v for k, v in state.items()}
    checkpoint[f"{prefix}text_model.embeddings.position_ids"] = torch.arange(77)[None]
    checkpoint["model.diffusion_model.out.2.bias"] = torch.zeros(4)

    for weights, key_prefix in ((state, ""), (checkpoint, prefix)):
        config = text_config_from_state_dict(weights, key_prefix)
        for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                      "num_attention_heads", "max_position_embeddings", "hidden_act", "layer_norm_eps"):
            assert getattr(config, field) == getattr(original, field), field
        assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (49406, 49407, 1)

    ids = tokenize(load_tokenizer(), ["a photograph of an astronaut riding a horse", ""])
    expected = tiny_text_model(ids).last_hidden_state
    model = load_text_encoder(checkpoint, "sd.safetensors", prefix=prefix)
    assert model.config._attn_implementation == "sdpa"
    assert not model.training
    assert all(not p.requires_grad for p in model.parameters())
    assert torch.equal(model.embeddings.position_ids, torch.arange(77)[None])
    hidden = encode(model, ids, "cpu")
    assert hidden.shape == (2, 77, 64)
    torch.testing.assert_close(hidden, expected, rtol=1e-5, atol=1e-5)


def test_missing_text_weight_is_named(tiny_text_model: CLIPTextModel) -> None:
    state = {f"text_model.{k}": v for k, v in tiny_text_model.state_dict().items()}
    del state["text_model.encoder.layers.1.mlp.fc2.bias"]
    missing = r"^sd\.safetensors: missing weights: text_model\.encoder\.layers\.1\.mlp\.fc2\.bias$"
    with pytest.raises(CheckpointError, match=missing):
        load_text_encoder(state, "sd.safetensors")


def test_width_not_a_multiple_of_64_is_a_clear_error() -> None:
    weights = {
        "text_model.embeddings.token_embedding.weight": torch.empty(49408, 96),
        "text_model.embeddings.position_embedding.weight": torch.empty(77, 96),
        "text_model.encoder.layers.0.mlp.fc1.weight": torch.empty(384, 96),
    }
    with pytest.raises(ValueError, match="96 is not a multiple of 64"):
        text_config_from_state_dict(weights)
    with pytest.raises(ValueError, match="no CLIP text encoder"):
        text_config_from_state_dict(weights, prefix="cond_stage_model.transformer.")
