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

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from sqlalchemy.orm import Session

from sdq.core.errors import InvalidInput, NotFound, Refused
from sdq.db.models import Item
from sdq.db.queries import batch_items
from sdq.images import watermark as wm
from sdq.images.provenance import WatermarkStatus, read_png_metadata
from sdq.sdmodel.embedding_files import embedding_files, file_sha256
from sdq.sdmodel.lora_files import describe_lora, find_lora
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


class MissingAdapter(NotFound):
    """A LoRA or embedding an item was made with is not here with the recorded sha256: the
    image cannot be made again (another file under the same name would make another image)."""


def check_adapters(items: Sequence[Item], lora_dirs: Sequence[Path], embeddings_dir: Path | None
                   ) -> None:
    """Every LoRA and embedding the items record is here, with the recorded sha256: checked
    before the model is loaded, without torch. MissingAdapter names the first that is not."""
    for item in items:
        for lora in item.loras or ():
            name, sha256 = lora["name"], lora["sha256"]
            try:
                found = describe_lora(find_lora(name, lora_dirs), name).sha256
            except (NotFound, InvalidInput) as exc:
                raise MissingAdapter(f"item {item.id} was made with LoRA {name} (sha256 "
                                     f"{sha256[:12]}), which is not here: {exc}; pass --lora-dir "
                                     "with a folder that holds it") from None
            if found != sha256:
                raise MissingAdapter(f"item {item.id} was made with LoRA {name} sha256 {sha256[:12]}; "
                                     f"{name} here has {found[:12]}: pass --lora-dir with the file it "
                                     "was made with")
        for embedding in item.embeddings or ():
            name, sha256 = embedding["name"], embedding["sha256"]
            paths = [p for p in (embedding_files(embeddings_dir) if embeddings_dir else ())
                     if p.stem == name]
            if [file_sha256(p) for p in paths] != [sha256]:
                where = f"in {embeddings_dir}" if embeddings_dir else "(no embeddings folder)"
                raise MissingAdapter(f"item {item.id} was made with embedding {name} (sha256 "
                                     f"{sha256[:12]}), which is not {where} with that hash; pass "
                                     "--embeddings-dir with the folder that holds it")


def regenerate(pipe: Pipeline, items: Sequence[Item]) -> list[Image.Image]:
    """The unmarked images of `items` (with their LoRAs), denoised as one batch in the given
    order (split in halves only if the device runs out of memory: `produce`)."""
    params = [item.params for item in items]
    loras = [[(r["name"], r["weight"], r["sha256"]) for r in item.loras or ()] for item in items]
    images: list[Image.Image] = []
    for produced in produce(pipe, params, batch_size=len(params),
                            loras=loras if any(loras) else None):
        images.extend(produced.images)
    return images


def compare(stored_png: bytes, regenerated: Image.Image) -> Comparison:
    """Mark `regenerated` as the stored file says it was marked, then compare pixels."""
    meta = read_png_metadata(stored_png)
    mark = meta.watermark if meta.watermark_status is WatermarkStatus.EMBEDDED else None
    image = regenerated.convert("RGB")
    if mark:
        image = wm.embed(image, mark)
    with Image.open(io.BytesIO(stored_png)) as stored_file:
        stored = np.asarray(stored_file.convert("RGB"), dtype=np.int16)
    ours = np.asarray(image, dtype=np.int16)
    if stored.shape != ours.shape:
        raise ReproduceError(f"the stored image is {stored.shape[1]}x{stored.shape[0]}, the "
                             f"regenerated one {ours.shape[1]}x{ours.shape[0]}")
    difference = np.abs(stored - ours)
    max_difference = int(difference.max())
    return Comparison(max_difference == 0, max_difference,
                      int(np.count_nonzero(difference.max(axis=2))),
                      stored.shape[0] * stored.shape[1], mark)

