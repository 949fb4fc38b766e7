"""The safety checker: preprocessing equal to CLIPImageProcessor's, and scores and flags equal to
diffusers' StableDiffusionSafetyChecker on the same random weights, saved by diffusers and loaded
by sdq. Thresholds are set from the measured similarities so that the reference's borderline
rules (rounding to 3 decimals, the special-care boost) decide some of the flags."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file, save_file

from sdq.sdmodel.modelfiles import CheckpointError, model_sha256
from sdq.sdmodel.safety import decoded_to_images, load_safety_checker, preprocess
from sdq.sdmodel.tiny import photo

VARIANTS = {
    # ViT-L/14's layout (patch 14 at 224 pixels, 64-channel heads, quick_gelu) at a tiny width.
    "vit-l14-scaled": dict(vision=dict(hidden_size=128, num_attention_heads=2, num_hidden_layers=2,
                                       intermediate_size=512, patch_size=14, image_size=224),
                           projection_dim=64, nested_keys=True),
    "other-config": dict(vision=dict(hidden_size=96, num_attention_heads=6, num_hidden_layers=3,
                                     intermediate_size=200, patch_size=16, image_size=160,
                                     hidden_act="gelu", layer_norm_eps=1e-6),
                         projection_dim=48, nested_keys=False),
}


def sample_images() -> list[Image.Image]:
    """Photo-like images of the sizes and modes a checker meets: square, landscape, portrait,
    odd, smaller than the crop, with transparency, greyscale."""
    drawn = photo(300, 301, seed=3)
    ImageDraw.Draw(drawn).ellipse((40, 50, 220, 260), fill=(230, 40, 20))
    translucent = photo(256, 256, seed=4).convert("RGBA")
    translucent.putalpha(Image.linear_gradient("L").resize((256, 256)))
    return [photo(512, 512, seed=1), photo(640, 480, seed=2), photo(480, 640, seed=5), drawn,
            photo(200, 150, seed=6), translucent, photo(512, 384, seed=7).convert("L")]


@pytest.mark.parametrize("size", [224, 160])
def test_preprocessing_equals_clip_image_processor(size):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    processor = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    images = sample_images()
    expected = processor(images, return_tensors="pt").pixel_values
    ours = preprocess(images, size)
    assert ours.shape == (len(images), 3, size, size) and ours.dtype == torch.float32
    assert torch.equal(ours, expected)


def test_decoded_tensor_becomes_the_images_users_get():
    images = [photo(64, 48, seed=s) for s in range(3)]
    pixels = torch.from_numpy(np.stack([np.asarray(im) for im in images])).permute(0, 3, 1, 2)
    decoded = pixels.float() / 127.5 - 1
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(decoded_to_images(decoded), images))


def own_direction(embeds: torch.Tensor, k: int) -> torch.Tensor:
    others, _ = torch.linalg.qr(torch.cat([embeds[:k], embeds[k + 1 :]]).T)
    return embeds[k] - others @ (others.T @ embeds[k])


def diffusers_checker(variant: dict, pixel_values: torch.Tensor):
    """Random weights, with concept k pointing where image k's embedding is orthogonal to all the
    other images' (similarity 0 to them): a random tower embeds all images nearly alike, and
    thresholds could not otherwise single one out."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig

    torch.manual_seed(0)
    checker = StableDiffusionSafetyChecker(
        CLIPConfig(vision_config=variant["vision"], projection_dim=variant["projection_dim"])
    ).eval()
    with torch.no_grad():
        embeds = checker.visual_projection(checker.vision_model(pixel_values)[1])
        distinct = torch.stack([own_direction(embeds, k) for k in range(len(embeds))])
        checker.concept_embeds.normal_()
        checker.special_care_embeds.normal_()
        checker.concept_embeds[: len(distinct)] = distinct
        checker.special_care_embeds[0] = distinct[1]
    return checker


def reference_similarities(checker, pixel_values: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """diffusers' cosine similarities, through its own modules and its own cosine function."""
    from diffusers.pipelines.stable_diffusion.safety_checker import cosine_distance

    with torch.no_grad():
        embeds = checker.visual_projection(checker.vision_model(pixel_values)[1])
        return (cosine_distance(embeds, checker.concept_embeds).numpy(),
                cosine_distance(embeds, checker.special_care_embeds).numpy())


def set_borderline_thresholds(checker, concepts: np.ndarray, special: np.ndarray) -> None:
    """No concept flags anything, except: image 0 clearly on concept 0; image 1 on concept 1 only
    through the special-care boost (-0.005 + 0.01); image 2 on concept 2 by 0.0004, which
    rounds to 0 and so does not flag."""
    concept_w = concepts.max(0) + 0.05
    special_w = special.max(0) + 0.05
    concept_w[0] = concepts[0, 0] - 0.02
    concept_w[1] = concepts[1, 1] + 0.005
    special_w[0] = special[1, 0] - 0.02
    concept_w[2] = concepts[2, 2] - 0.0004
    with torch.no_grad():
        checker.concept_embeds_weights.copy_(torch.from_numpy(concept_w))
        checker.special_care_embeds_weights.copy_(torch.from_numpy(special_w))


@pytest.fixture(scope="module", params=list(VARIANTS))
def saved(request, tmp_path_factory):
    """A pipeline folder holding a diffusers-saved checker with borderline thresholds."""
    variant = VARIANTS[request.param]
    pixel_values = preprocess(sample_images(), variant["vision"]["image_size"])
    checker = diffusers_checker(variant, pixel_values)
    set_borderline_thresholds(checker, *reference_similarities(checker, pixel_values))
    pipeline = tmp_path_factory.mktemp("pipeline")
    checker.save_pretrained(pipeline / "safety_checker")
    if variant["nested_keys"]:  # the layout transformers 4 wrote, as on the hub
        weights = pipeline / "safety_checker" / "model.safetensors"
        save_file({k.replace("vision_model.", "vision_model.vision_model.", 1): v
                   for k, v in load_file(str(weights)).items()}, str(weights))
    return pipeline, checker, pixel_values


def test_scores_and_flags_equal_diffusers(saved):
    pipeline, reference, pixel_values = saved
    checker = load_safety_checker(pipeline / "safety_checker")
    with torch.inference_mode():
        concepts, special = (t.numpy() for t in checker.similarities(pixel_values))
    ref_concepts, ref_special = reference_similarities(reference, pixel_values)
    assert np.abs(concepts - ref_concepts).max() < 1e-5
    assert np.abs(special - ref_special).max() < 1e-5

    _, ref_flags = reference(clip_input=pixel_values, images=np.zeros((len(pixel_values), 8, 8, 3)))
    results = checker.score(pixel_values)
    assert [r.flagged for r in results] == ref_flags
    assert results[0].flagged and results[1].flagged and not results[2].flagged
    assert results[1].special_scores[0] > 0 and results[1].concept_scores[1] == pytest.approx(0.005, abs=2e-3)
    assert results[2].concept_scores[2] == 0.0
    boost = np.array([0.01 if any(s > 0 for s in r.special_scores) else 0.0 for r in results])
    thresholds = reference.concept_embeds_weights.numpy()
    expected = ref_concepts - thresholds + boost[:, None]
    assert np.abs(np.array([r.concept_scores for r in results]) - expected).max() <= 5e-4 + 1e-6


def test_pipeline_folder_and_pil_images(saved):
    """A full pipeline folder finds its checker; PIL images go through the same preprocessing;
    the checker's identity is its folder's hash, as a model's is."""
    pipeline, _, pixel_values = saved
    checker = load_safety_checker(pipeline)
    assert checker.sha256 == model_sha256(pipeline / "safety_checker")
    assert checker.short_hash == checker.sha256[:10]
    assert checker.check(sample_images()) == checker.score(pixel_values)


def test_config_that_disagrees_with_weights_is_one_clear_error(saved, tmp_path):
    pipeline, _, _ = saved
    folder = shutil.copytree(pipeline / "safety_checker", tmp_path / "safety_checker")
    config = json.loads((folder / "config.json").read_text())
    config["vision_config"]["num_hidden_layers"] += 1
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"safety_checker/config\.json: does not match model\.safetensors: "
                                              r"missing weights: vision_model\.encoder\.layers\.\d+\.") as caught:
        load_safety_checker(folder)
    assert "\n" not in str(caught.value)
    with pytest.raises(CheckpointError, match="no such safety checker folder"):
        load_safety_checker(tmp_path / "elsewhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no safety checker here"):
        load_safety_checker(tmp_path / "empty")
