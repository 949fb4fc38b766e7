"""Diffusers folders are loaded as their configs say, checked against diffusers' own pipeline
loaded from the same folder.

The fixtures vary what tiny test models used to share by accident: the text encoders have 8- and
16-channel heads (a loader that assumed CLIP's 64 would refuse the first and silently run the
second with 2 heads instead of 8), another activation, layer-norm epsilon and position count, and
the UNets other head counts, depths, projections and attention levels.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from sdq.sdmodel import clip
from sdq.sdmodel.modelfiles import CheckpointError
from sdq.sdmodel.diffusers_reference import SD15_SCHEDULER
from sdq.sdmodel.pipeline import Request, load_pipeline

from .test_pipeline import LATENT_TOL, PIXEL_TOL, pixels, run_reference

VARIANTS: dict[str, dict[str, dict[str, Any]]] = {
    "8-channel-heads": {
        "text_encoder": dict(hidden_size=32, num_attention_heads=4, num_hidden_layers=3, intermediate_size=48,
                             hidden_act="gelu", layer_norm_eps=1e-6, max_position_embeddings=80,
                             projection_dim=16),
        "unet": dict(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
                     down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                     attention_head_dim=4, transformer_layers_per_block=2),
        "vae": dict(block_out_channels=(32, 32, 64, 64), layers_per_block=1),
    },
    "16-channel-heads": {
        "text_encoder": dict(hidden_size=128, num_attention_heads=8, num_hidden_layers=2, intermediate_size=256,
                             hidden_act="quick_gelu"),
        "unet": dict(block_out_channels=(32, 64), layers_per_block=2, cross_attention_dim=128,
                     down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                     up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                     attention_head_dim=[2, 4], use_linear_projection=True, upcast_attention=True),
        "vae": dict(block_out_channels=(32, 64, 64, 64), layers_per_block=2),
    },
}
PROMPTS = ["a red cube on a table", "portrait of an old fisherman, oil", ""]
REQUESTS = [Request("a red cube on a table", "blurry", seed=11), Request("a lighthouse", "", seed=5, cfg=4.0)]


def save_folder(folder: Path, variant: dict[str, dict[str, Any]], *, nested_text_keys: bool) -> None:
    """A diffusers pipeline of random weights saved by diffusers, with the tiny models' usual
    scaling (token embeddings and cross-attention outputs) so that prompts reach the pixels."""
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, **variant["text_encoder"]))
    unet = diffusers.UNet2DConditionModel(sample_size=8, **variant["unet"])
    vae = diffusers.AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, **variant["vae"]
    )
    with torch.no_grad():
        text.get_input_embeddings().weight.normal_(0, 1.0)
        for name, module in unet.named_modules():
            if name.endswith("attn2.to_out.0"):
                module.weight.mul_(4.0)
    diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=text, tokenizer=clip.load_tokenizer(), unet=unet,
        scheduler=diffusers.PNDMScheduler.from_config(SD15_SCHEDULER),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    ).save_pretrained(folder)
    if nested_text_keys:  # the layout of the files on the hub, written by transformers 4
        weights = folder / "text_encoder" / "model.safetensors"
        save_file({f"text_model.{k}": v for k, v in load_file(str(weights)).items()}, str(weights))


@pytest.fixture(scope="module", params=list(VARIANTS))
def folder(request, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("folders") / request.param
    save_folder(path, VARIANTS[request.param], nested_text_keys=request.param == "16-channel-heads")
    return path


@pytest.fixture(scope="module")
def pipes(folder: Path):
    import diffusers

    reference = diffusers.StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    reference.set_progress_bar_config(disable=True)
    return load_pipeline(folder, device="cpu", dtype="fp32"), reference


def text_states(text_encoder, tokenizer) -> torch.Tensor:
    with torch.inference_mode():
        return clip.encode(text_encoder, clip.tokenize(tokenizer, PROMPTS), "cpu")


def test_text_encoder_matches_diffusers(pipes, folder):
    pipe, reference = pipes
    ours = text_states(pipe.text_encoder, pipe.tokenizer)
    theirs = text_states(reference.text_encoder, reference.tokenizer)
    assert ours.shape == (3, 77, reference.text_encoder.config.hidden_size)
    assert (ours - theirs).abs().max().item() < 1e-5
    # The control: the same weights with the heads inferred from the width (CLIP's 64-channel
    # convention, right for single files) are refused or give other numbers.
    weights = load_file(str(folder / "text_encoder" / "model.safetensors"))
    try:
        guessed = clip.load_text_encoder(weights, "model.safetensors")
    except CheckpointError as exc:
        assert "not a multiple of 64" in str(exc)
    else:
        assert (text_states(guessed, pipe.tokenizer) - theirs).abs().max().item() > 1e-2


@pytest.mark.parametrize("sampler", ["ddim", "euler_a"])
def test_images_match_diffusers_from_the_same_folder(pipes, sampler):
    pipe, reference = pipes
    requests = [Request(r.prompt, r.negative_prompt, r.seed, 7.5) for r in REQUESTS]
    ref_latents, ref_images = run_reference(reference, sampler, requests, 6, 64, 64)
    latents = pipe.denoise(requests, sampler=sampler, steps=6, width=64, height=64)
    assert (latents - ref_latents).abs().max().item() < LATENT_TOL
    assert np.abs(pixels(pipe.decode(latents)) - ref_images).max() <= PIXEL_TOL
    other = pipe.denoise([Request("a green forest", "blurry", seed=11)], sampler=sampler, steps=6, width=64, height=64)
    assert (other[0] - ref_latents[0]).abs().max().item() > 50 * LATENT_TOL


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pristine") / "model"
    save_folder(path, VARIANTS["8-channel-heads"], nested_text_keys=False)
    return path


def edit_config(folder: Path, part: str, **changes: Any) -> None:
    file = folder / part / "config.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), **changes}))


@pytest.mark.parametrize(
    ("part", "changes", "message"),
    [
        ("text_encoder", dict(num_hidden_layers=4), r"text_encoder/config\.json: does not match model\.safetensors: "
                                                    r"missing weights: encoder\.layers\.3\."),
        ("text_encoder", dict(hidden_size=48), r"text_encoder/config\.json: does not match model\.safetensors: "
                                               r".* has shape \(\d+(, \d+)?\), expected \(\d+(, \d+)?\)"),
        ("text_encoder", dict(num_attention_heads=5),
         r"hidden size \(32\) is not a multiple of the number of attention heads \(5\)"),
        ("text_encoder", dict(max_position_embeddings=64), r"max_position_embeddings = 64: prompts are 77 tokens"),
        ("text_encoder", dict(architectures=["CLIPTextModelWithProjection"]), r"architectures = "),
        ("text_encoder", dict(hidden_act="swish_ish"), r"hidden_act = 'swish_ish': unknown activation"),
        ("text_encoder", dict(num_hidden_layers="3"), r"num_hidden_layers' expected int, got str"),
        ("unet", dict(layers_per_block=2), r"unet/config\.json: does not match diffusion_pytorch_model\.safetensors: "
                                           r"missing weights: "),
        ("unet", dict(norm_num_groups=16, act_fn="gelu"),
         r"unet/config\.json: act_fn = \"gelu\": sdq's UNet implements \"silu\" only; norm_num_groups = 16"),
        ("unet", dict(attention_head_dim=[4, 2]), r"attention_head_dim = \[4, 2\]: sdq's UNet needs one head count"),
        ("unet", dict(up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"]), r"up_block_types = .*mirrors"),
        ("vae", dict(scaling_factor=0.13025), r"vae/config\.json: scaling_factor = 0\.13025: .* 0\.18215 only"),
        ("vae", dict(block_out_channels=[32, 32, 64]), r"needs 4 levels"),
    ],
)
def test_config_that_disagrees_is_one_clear_error(tmp_path, pristine, part, changes, message):
    folder = shutil.copytree(pristine, tmp_path / "model")
    edit_config(folder, part, **changes)
    with pytest.raises(CheckpointError, match=message) as caught:
        load_pipeline(folder, device="cpu")
    assert "\n" not in str(caught.value)
    assert str(caught.value).startswith(str(folder / part / "config.json"))


def test_tokenizer_of_another_length_is_refused(tmp_path, pristine):
    folder = shutil.copytree(pristine, tmp_path / "model")
    file = folder / "tokenizer" / "tokenizer_config.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), "model_max_length": 64}))
    with pytest.raises(CheckpointError, match=r"tokenizer_config\.json: model_max_length = 64: sdq's prompts are 77"):
        load_pipeline(folder, device="cpu")
