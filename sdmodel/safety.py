"""The safety checker of SD's reference scripts and of diffusers' pipeline, scoring images.

The checker (diffusers' `StableDiffusionSafetyChecker`, the `safety_checker/` folder of a
pipeline) is a CLIP image tower whose pooled output is projected into CLIP's joint space and
compared, by cosine similarity, with 17 concept embeddings and 3 "special care" embeddings, each
with its own threshold. A concept scores `similarity - threshold`, rounded to 3 decimals; an
image is flagged when any concept scores above 0. When any special-care concept scores above 0,
every later score gets +0.01, so borderline concepts then flag. The rounding and the order of that
adjustment decide borderline flags, so they are kept as the reference has them.

The image tower is transformers' `CLIPVisionModel`, built from the folder's config.json; the head
is the few lines here. Preprocessing equals CLIPImageProcessor's: resize the shortest side to the
tower's input size with PIL's bicubic filter, center crop, scale to [0, 1], normalise with CLIP's
mean and standard deviation. The checker only scores; what becomes of a flagged image (kept,
blacked out or dropped) is the job's choice, applied by the runner (`worker/runner.py`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from .checkpoint import load_weights, read_weights
from .modelfiles import CheckpointError, ModelNotFound, model_sha256, resolve_model_ref

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SPECIAL_CARE_BOOST = 0.01
"""Added to every later score once a special-care concept scores above 0 (the reference's value)."""
SCORE_DECIMALS = 3
"""The reference rounds scores before comparing them with 0, so 0.0004 does not flag."""
_ARCHITECTURE = "StableDiffusionSafetyChecker"


@dataclass(frozen=True)
class SafetyScores:
    """One image's verdict: flagged, and how far each concept is above (> 0) its threshold."""

    flagged: bool
    concept_scores: tuple[float, ...]
    special_scores: tuple[float, ...]


def _rgb(image: Image.Image) -> Image.Image:
    """RGB with any transparency composited onto white, as transformers converts."""
    if "A" not in image.getbands() and image.info.get("transparency") is None:
        return image.convert("RGB")
    white = Image.new("RGBA", image.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")


def preprocess(images: Sequence[Image.Image], size: int = 224) -> Tensor:
    """(B, 3, size, size) float32 pixels exactly as CLIPImageProcessor makes them."""
    mean, std = np.array(CLIP_MEAN, np.float32), np.array(CLIP_STD, np.float32)
    batch = []
    for image in images:
        image = _rgb(image)
        width, height = image.size
        short, long = min(width, height), max(width, height)
        long = int(size * long / short)  # truncation, as transformers sizes it
        image = image.resize((size, long) if width <= height else (long, size), Image.BICUBIC)
        left, top = (image.width - size) // 2, (image.height - size) // 2
        pixels = np.asarray(image.crop((left, top, left + size, top + size)))
        # In transformers' order and precision: scaled in float64, then float32 arithmetic.
        scaled = (pixels.astype(np.float64) * (1 / 255)).astype(np.float32)
        batch.append(((scaled - mean) / std).transpose(2, 0, 1))
    return torch.from_numpy(np.stack(batch))


def decoded_to_images(decoded: Tensor) -> list[Image.Image]:
    """The autoencoder's (B, 3, H, W) output in [-1, 1] as the 8-bit images users get."""
    pixels = ((decoded.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    return [Image.fromarray(np.ascontiguousarray(a)) for a in pixels.permute(0, 2, 3, 1).cpu().numpy()]


def _decimals(scores: Tensor) -> tuple[float, ...]:
    """Python floats as the reference reports them (0.03, not float32's 0.029999999329447746)."""
    return tuple(round(value, SCORE_DECIMALS) for value in scores.tolist())


class SafetyChecker(nn.Module):
    """CLIP image tower + projection + concept embeddings and thresholds; see the module doc."""

    def __init__(self, vision: nn.Module, projection_dim: int, concepts: int, special: int, *, sha256: str) -> None:
        super().__init__()
        hidden = vision.config.hidden_size
        self.vision_model = vision
        self.visual_projection = nn.Linear(hidden, projection_dim, bias=False)
        self.concept_embeds = nn.Parameter(torch.empty(concepts, projection_dim), requires_grad=False)
        self.concept_embeds_weights = nn.Parameter(torch.empty(concepts), requires_grad=False)
        self.special_care_embeds = nn.Parameter(torch.empty(special, projection_dim), requires_grad=False)
        self.special_care_embeds_weights = nn.Parameter(torch.empty(special), requires_grad=False)
        self.sha256 = sha256

    @property
    def short_hash(self) -> str:
        return self.sha256[:10]

    def similarities(self, pixel_values: Tensor) -> tuple[Tensor, Tensor]:
        """Cosine similarities (float32) of each image to the concepts and special-care concepts."""
        pooled = self.vision_model(pixel_values.to(self.concept_embeds.device, self.concept_embeds.dtype)).pooler_output
        image = F.normalize(self.visual_projection(pooled).float())
        return (image @ F.normalize(self.concept_embeds.float()).T,
                image @ F.normalize(self.special_care_embeds.float()).T)

    @torch.inference_mode()
    def score(self, pixel_values: Tensor) -> list[SafetyScores]:
        """Scores and flags of preprocessed images, with the reference's rounding and boost."""
        concept_sim, special_sim = self.similarities(pixel_values)
        boost = torch.zeros(concept_sim.shape[0], device=concept_sim.device)
        special = []
        for j in range(special_sim.shape[1]):  # in order: a positive score boosts the next ones
            threshold = self.special_care_embeds_weights[j].float()
            s = torch.round(special_sim[:, j] - threshold + boost, decimals=SCORE_DECIMALS)
            boost = torch.where(s > 0, SPECIAL_CARE_BOOST, boost)
            special.append(s)
        concepts = torch.round(concept_sim - self.concept_embeds_weights.float() + boost[:, None],
                               decimals=SCORE_DECIMALS).cpu()
        specials = torch.stack(special, dim=1).cpu() if special else torch.zeros(len(concepts), 0)
        return [
            SafetyScores(bool((c > 0).any()), _decimals(c), _decimals(s))
            for c, s in zip(concepts, specials)
        ]

    def check(self, images: Sequence[Image.Image] | Tensor) -> list[SafetyScores]:
        """Score 8-bit images, or the autoencoder's decoded tensor (converted as users get it)."""
        if isinstance(images, Tensor):
            images = decoded_to_images(images)
        return self.score(preprocess(images, self.vision_model.config.image_size))


_WEIGHT_NAMES = ("model.safetensors", "model.fp16.safetensors", "pytorch_model.bin", "pytorch_model.fp16.bin")
_HUB_FILES = [f"{folder}{name}" for folder in ("", "safety_checker/") for name in ("config.json", *_WEIGHT_NAMES)]
"""A hub repo's files a checker needs: its own (a checker repo) or its pipeline's subfolder."""


def find_safety_checker(ref: str | Path) -> Path:
    """The checker folder `ref` names: a `safety_checker/` folder, a pipeline folder holding
    one, or (when not a local path) a Hugging Face repo id of either, from the HF cache or
    fetched into it when the network allows (only the checker's files)."""
    try:
        path = resolve_model_ref(ref, files=_HUB_FILES)
    except ModelNotFound:
        raise CheckpointError(ref, "no such safety checker folder, and not a Hugging Face repo "
                                   "id in the cache or reachable") from None
    return _checker_folder(path)


def _checker_folder(path: Path) -> Path:
    """A `safety_checker/` folder itself, or the one inside a full pipeline folder."""
    inside = path / "safety_checker"
    folder = inside if inside.is_dir() else path
    if not (folder / "config.json").is_file():
        raise CheckpointError(path, "no safety checker here: expected safety_checker/config.json or config.json")
    return folder


def _weights_file(folder: Path) -> Path:
    for name in _WEIGHT_NAMES:
        if (folder / name).is_file():
            return folder / name
    raise CheckpointError(folder, "no model.safetensors or pytorch_model.bin")


def _vision_config(config_file: Path):
    """The image tower's config and the projection width, from the checker's CLIPConfig."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import CLIPConfig

    try:
        settings = json.loads(config_file.read_text())
    except ValueError as exc:
        raise CheckpointError(config_file, f"not valid JSON: {exc}") from None
    if settings.get("architectures", [_ARCHITECTURE]) != [_ARCHITECTURE]:
        raise CheckpointError(config_file, f"architectures = {settings['architectures']}: not a {_ARCHITECTURE}")
    try:
        config = CLIPConfig.from_dict(settings)
    except StrictDataclassError as exc:
        raise CheckpointError(config_file, str(exc.__cause__ or exc)) from None
    return config.vision_config, config.projection_dim


def load_safety_checker(
    ref: str | Path, *, device: str = "cpu", dtype: torch.dtype = torch.float32, hash_cache: Path | None = None,
) -> SafetyChecker:
    """A checker from a `safety_checker/` folder, a pipeline folder holding one, or a hub id
    (see `find_safety_checker`).

    Its identity, like a model's, is the sha256 of its folder's files. Weights saved by
    transformers 4 nest the tower one level deeper (`vision_model.vision_model.*`); both load.
    """
    from transformers import CLIPVisionModel

    folder = find_safety_checker(ref)
    config_file, weights_file = folder / "config.json", _weights_file(folder)
    vision_config, projection_dim = _vision_config(config_file)
    weights = {
        key.removeprefix("vision_model.") if key.startswith("vision_model.vision_model.") else key: value
        for key, value in read_weights(weights_file).items() if not key.endswith("position_ids")
    }
    if "concept_embeds" not in weights or "special_care_embeds" not in weights:
        raise CheckpointError(weights_file, "not a safety checker: no concept_embeds or special_care_embeds")
    with torch.device("meta"):
        vision = CLIPVisionModel._from_config(vision_config, attn_implementation="sdpa")
        checker = SafetyChecker(vision, projection_dim, len(weights["concept_embeds"]),
                                len(weights["special_care_embeds"]), sha256=model_sha256(folder, hash_cache))
    try:
        load_weights(checker, weights, weights_file)
    except CheckpointError as exc:
        raise CheckpointError(config_file, f"does not match {weights_file.name}: {exc.problem}") from None
    vision.embeddings.position_ids = torch.arange(vision.embeddings.num_positions)[None]
    return checker.to(device=device, dtype=dtype).eval().requires_grad_(False)
