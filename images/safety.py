"""What the safety checker's verdict does to an image and its PNG, the same in the runner and
`sdq generate`.

The checker (`sdmodel.safety`) only scores. A job's `on_flag` decides the rest: a flagged image
is kept as generated, replaced by a black image of the same size, or dropped (no image stored);
an image the checker passes is always kept. The verdict, with that action, goes into the item
row and the PNG's `sdq` chunk, so a black image says why it is black.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from PIL import Image

from sdq.core.jobspec import SAFETY_ACTIONS

from .provenance import EncodedPng, Provenance, SafetyVerdict, encode_png

if TYPE_CHECKING:
    from sdq.sdmodel.safety import SafetyChecker


def judge(checker: SafetyChecker, images: Sequence[Image.Image], on_flag: Sequence[str]) -> list[SafetyVerdict]:
    """Score `images` in one call to `checker` and decide each one's action from its own
    `on_flag`."""
    return [SafetyVerdict(checker.sha256, score.flagged, score.concept_scores, score.special_scores,
                          SAFETY_ACTIONS[flag] if score.flagged else "kept")
            for score, flag in zip(checker.check(list(images)), on_flag)]


def stored_image(image: Image.Image, verdict: SafetyVerdict | None) -> Image.Image | None:
    """The image to store after the verdict: as generated, black, or None (dropped)."""
    if verdict is None or verdict.action == "kept":
        return image
    return Image.new("RGB", image.size) if verdict.action == "blacked" else None


def encode_judged(image: Image.Image, verdict: SafetyVerdict | None, provenance: Provenance, *,
                  watermark: str | None, level: int) -> EncodedPng | None:
    """The PNG stored for a generated image after its verdict: as generated, with the
    watermark; black, without it (a black image is not what the model made); or None
    (dropped)."""
    stored = stored_image(image, verdict)
    if stored is None:
        return None
    return encode_png(stored, provenance, watermark=watermark if stored is image else None,
                      level=level)
