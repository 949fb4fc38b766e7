"""Prompts to text states: today's tensors for weight-1 and plain prompts, A1111's emphasis and
clip skip checked against computations on the transformers model, long prompts in chunks,
and images that do not depend on the chunk counts of their batch-mates."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel

from sdq.core.errors import InvalidInput
from sdq.core.params import ParamError, Request
from sdq.sdmodel import clip
from sdq.sdmodel.conditioning import PromptText, encode_prompts
from sdq.sdmodel.pipeline import Pipeline, load_pipeline
from sdq.sdmodel.prompts import prompt_chunks

from .test_pipeline import pixels

WORDS = "red green blue cat dog fox tree house river mountain cloud stone".split()
LONG = " ".join(WORDS[i % len(WORDS)] + ("," if i % 9 == 8 else "") for i in range(150))
"""150 words and 16 commas: three chunks."""


@pytest.fixture(scope="module")
def pipe(tiny_checkpoint) -> Pipeline:
    return load_pipeline(tiny_checkpoint, device="cpu", dtype="fp32")


def states(pipe: Pipeline, *prompts: PromptText) -> list[torch.Tensor]:
    return encode_prompts(pipe.text_encoder, pipe.tokenizer, prompts, "cpu")


def today(pipe: Pipeline, *prompts: str) -> torch.Tensor:
    return clip.encode(pipe.text_encoder, clip.tokenize(pipe.tokenizer, prompts), "cpu")


def test_weight_one_prompts_give_exactly_todays_states(pipe) -> None:
    prompts = ["a red cube on a table", "portrait of an old fisherman, oil", ""]
    for syntax in ("a1111", "plain"):
        ours = states(pipe, *(PromptText(p, syntax, 1) for p in prompts))
        assert torch.equal(torch.stack(ours), today(pipe, *prompts))


def test_plain_prompts_are_cut_with_the_warning_as_before(pipe) -> None:
    with pytest.warns(clip.PromptTruncated):
        (plain,) = states(pipe, PromptText(LONG, "plain", 1))
    with pytest.warns(clip.PromptTruncated):
        assert torch.equal(plain, today(pipe, LONG)[0])
    (literal,) = states(pipe, PromptText("a (red:1.5) cube BREAK", "plain", 1))
    assert torch.equal(literal, today(pipe, "a (red:1.5) cube BREAK")[0])


def test_emphasis_scales_each_vector_and_keeps_the_chunk_mean(pipe) -> None:
    (ours,) = states(pipe, PromptText("a (red:1.5) [cube]", "a1111", 1))
    z = today(pipe, "a red cube")[0]
    weights = torch.ones(77)
    weights[2], weights[3] = 1.5, 1 / 1.1
    expected = z * weights[:, None]
    expected = expected * (z.mean() / expected.mean())
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-6)
    assert (ours - z).abs().max() > 0.1
    assert ours.mean().item() == pytest.approx(z.mean().item(), rel=1e-5)


def test_clip_skip_2_is_the_penultimate_layer_through_the_final_norm(pipe) -> None:
    """Checked on a copy of the text encoder with its last layer removed: its output is the
    penultimate layer's, through the same final layer norm."""
    config = CLIPTextConfig(**{**pipe.text_encoder.config.to_dict(), "num_hidden_layers": 1})
    shallow = CLIPTextModel(config).eval()
    shallow.load_state_dict(pipe.text_encoder.state_dict(), strict=False)
    ids = clip.tokenize(pipe.tokenizer, ["a red cube", ""])
    with torch.no_grad():
        expected = shallow(ids).last_hidden_state
    ours = states(pipe, PromptText("a red cube", "a1111", 2), PromptText("", "plain", 2))
    torch.testing.assert_close(torch.stack(ours), expected, rtol=1e-5, atol=1e-5)
    assert (ours[0] - today(pipe, "a red cube")[0]).abs().max() > 0.1
    with pytest.raises(InvalidInput, match=r"clip_skip: must be between 1 and 2 .*got 3"):
        states(pipe, PromptText("a red cube", "a1111", 3))


def test_long_prompts_are_chunks_encoded_apart_and_joined(pipe) -> None:
    (ours,) = states(pipe, PromptText(LONG, "a1111", 1))
    assert ours.shape == (3 * 77, 64)
    chunks = prompt_chunks(LONG, pipe.tokenizer)
    ids = torch.tensor([c.ids for c in chunks])
    assert torch.equal(ours, clip.encode(pipe.text_encoder, ids, "cpu").reshape(3 * 77, 64))
    (broken,) = states(pipe, PromptText("red cat BREAK dog", "a1111", 1))
    assert broken.shape == (2 * 77, 64)
    assert torch.equal(broken[77:], today(pipe, "dog")[0])


def test_request_fields_are_checked() -> None:
    assert Request("x").prompt_syntax == "a1111" and Request("x").clip_skip == 1
    assert Request("x", prompt_syntax=" Plain ").prompt_syntax == "plain"
    with pytest.raises(ParamError, match=r"prompt_syntax: unknown prompt syntax 'comfy' \(known: a1111, plain\)"):
        Request("x", prompt_syntax="comfy")
    with pytest.raises(ParamError, match="clip_skip: must be between 1 and 12, got 13"):
        Request("x", clip_skip=13)


def test_a_long_prompt_gives_the_same_image_alone_and_beside_a_short_one(pipe) -> None:
    """Three prompt chunks against one of negative prompt: the UNet runs per context length,
    so neither the long nor the short image sees padding from the other."""
    settings = dict(sampler="euler_a", steps=3, width=64, height=64)
    long = Request(LONG, "blurry", seed=5, cfg=7.0)
    short = Request("a bowl of fruit", "", seed=7, cfg=7.5)
    alone = pixels(pipe.generate([long], **settings))[0]
    short_alone = pixels(pipe.generate([short], **settings))[0]
    together = pixels(pipe.generate([short, long], **settings))
    assert np.abs(together[1] - alone).max() <= 1
    assert np.abs(together[0] - short_alone).max() <= 1
    cut = Request(LONG.rsplit(",", 2)[0], "blurry", seed=5, cfg=7.0)  # the last words dropped
    assert np.abs(pixels(pipe.generate([cut], **settings))[0] - alone).mean() > 1.0
