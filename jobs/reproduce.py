"""Regenerate a recorded image from its provenance and compare it with the stored one.

The stored PNG is watermarked after decoding (`provenance.encode_png`), and the mark cannot be
taken out again, so the comparison goes the other way: the regenerated pixels get the same
mark -- the text the stored file records as embedded, through the same deterministic
`watermark.embed` -- and the two marked images are compared. Identical decoder output thus
gives identical pixels. When the decoder output differs, the mark's quantisation (steps of 36
in the wavelet domain) can turn a one-level difference in a rare block into a larger one, so
the largest difference reported for a marked image is an upper bound of the decoder's own;
images under 256x256 carry no mark and are compared as they are.

"In the recorded batch composition" means the items that share the item's `batch_id`, in
their `batch_position` order: the runner records the group it actually denoised together
(after any split for shape or memory), so this is the same tensor shape and the same CFG
batch. Alone, the image still comes from the same seed and generator, and differs only by
the float rounding of another batch shape (within one 8-bit level, see DESIGN.md).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image
from sqlalchemy.orm import Session

from sdq.core.errors import Refused
from sdq.db.models import Item
from sdq.db.queries import batch_items
from sdq.images import watermark as wm
from sdq.images.imagefile import open_image
from sdq.images.provenance import WatermarkStatus, read_png_metadata
from sdq.sdmodel.pipeline import Pipeline
from sdq.sdmodel.produce import produce


class ReproduceError(Refused):
    """The item cannot be reproduced as asked (no image, no batch, a gap in its batch)."""


@dataclass(frozen=True)
class Comparison:
    """How a regenerated image compares with the stored one, both as stored (marked)."""

    identical: bool
    max_difference: int
    """Largest absolute difference of one 8-bit channel value; 0 when identical."""
    differing_pixels: int
    pixels: int
    watermark: str | None
    """The mark applied to the regenerated pixels before comparing (None: unmarked)."""


def composition(session: Session, item: Item, *, in_batch: bool) -> list[Item]:
    """The items to regenerate together: `item` alone, or its recorded batch, checked to be
    whole (positions 0..n-1) and of one shape."""
    if not in_batch:
        return [item]
    if item.batch_id is None:
        raise ReproduceError(f"item {item.id} records no batch")
    batch = batch_items(session, item.batch_id)
    positions = [member.batch_position for member in batch]
    if positions != list(range(len(batch))) or item not in batch:
        raise ReproduceError(f"batch {item.batch_id} is incomplete in the database "
                             f"(positions {positions})")
    shapes = {member.params.shape for member in batch}
    if len(shapes) > 1:
        raise ReproduceError(f"batch {item.batch_id} mixes sizes or samplers: {sorted(shapes)}")
    return list(batch)


def regenerate(pipe: Pipeline, items: Sequence[Item]) -> list[Image.Image]:
    """The unmarked images of `items`, denoised as one batch in the given order (split in
    halves only if the device runs out of memory: `produce`)."""
    params = [item.params for item in items]
    images: list[Image.Image] = []
    for produced in produce(pipe, params, batch_size=len(params)):
        images.extend(produced.images)
    return images


def compare(stored_png: bytes, regenerated: Image.Image) -> Comparison:
    """Mark `regenerated` as the stored file says it was marked, then compare pixels."""
    meta = read_png_metadata(stored_png)
    mark = meta.watermark if meta.watermark_status is WatermarkStatus.EMBEDDED else None
    image = regenerated.convert("RGB")
    if mark:
        image = wm.embed(image, mark)
    stored = np.asarray(open_image(stored_png, "the stored image").convert("RGB"), dtype=np.int16)
    ours = np.asarray(image, dtype=np.int16)
    if stored.shape != ours.shape:
        raise ReproduceError(f"the stored image is {stored.shape[1]}x{stored.shape[0]}, the "
                             f"regenerated one {ours.shape[1]}x{ours.shape[0]}")
    difference = np.abs(stored - ours)
    max_difference = int(difference.max())
    return Comparison(max_difference == 0, max_difference,
                      int(np.count_nonzero(difference.max(axis=2))),
                      stored.shape[0] * stored.shape[1], mark)

