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

So the recorded batch is what `sdq reproduce` replays by default, and it passes only on
identical pixels; `alone` (`--alone`) regenerates the one image, and passes within one level,
saying why a difference there is expected.

An image-to-image member starts from its init image as the worker did: read from storage under
its recorded sha256 (`images.stored_init`), never from the file it was submitted from, which may
be gone or changed; a missing or altered one refuses the replay, naming it.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from sqlalchemy.orm import Session

from sdq.core.errors import InvalidInput, NotFound, Refused
from sdq.core.init_image import InitImage
from sdq.core.params import GenerationParams, short_hash
from sdq.core.states import Status
from sdq.db.models import Item
from sdq.db.queries import batch_items, get_item
from sdq.images import watermark as wm
from sdq.images.imagefile import open_image
from sdq.images.provenance import WatermarkStatus, read_png_metadata
from sdq.images.storage import Storage
from sdq.images.stored_init import InitImages
from sdq.sdmodel.embedding_files import embedding_files, file_sha256
from sdq.sdmodel.img2img import Init
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


ALONE_TOLERANCE = 1
"""Largest difference, in 8-bit levels, that an image regenerated alone may show and still
pass: one image and a batch round their matrix products in another order (DESIGN.md)."""

WHY_ALONE_DIFFERS = ("a batch's matrix products are summed in another order than one "
                     "image's, which can move the last bit of a float and so a few pixels "
                     "by one level")


@dataclass(frozen=True)
class Target:
    """What `reproduce` regenerates, read from the index: the item, the batch it is made
    with (in order), and the model and stored image to check it against."""

    item_id: int
    members: list[GenerationParams]
    position: int
    batch_id: str | None
    """The recorded batch replayed; None when the image is regenerated alone."""
    recorded_batch_size: int | None
    model_sha256: str
    source: str
    image_key: str
    recorded_device: str | None
    loras: list[LoraSet] = field(default_factory=list)
    """Each member's LoRAs, in `members`' order."""
    inits: list[InitImage | None] = field(default_factory=list)
    """Each member's init image and strength (None: text-to-image), in `members`' order."""

    def starts(self, storage: Storage) -> list[Init | None]:
        """Each member's img2img start, its init image read from `storage` (each distinct one
        once): UnusableInit when one is missing or not as recorded, StorageError when storage
        fails. Read before the model is loaded, so a missing init costs no load."""
        images = InitImages(storage)
        return [None if init is None else Init(images.get(init.sha256), init.strength)
                for init in self.inits]


@dataclass(frozen=True)
class Outcome:
    """A reproduction: how it compared, and whether that counts as reproduced."""

    target: Target
    comparison: Comparison
    device: str
    dtype: str

    @property
    def passed(self) -> bool:
        """Identical pixels in the recorded batch; within `ALONE_TOLERANCE` alone."""
        if self.target.batch_id is not None:
            return self.comparison.identical
        return self.comparison.max_difference <= ALONE_TOLERANCE

    def record(self) -> dict[str, Any]:
        """The outcome as one JSON object (`--json`)."""
        t = self.target
        init = t.inits[t.position] if t.inits else None
        return {"item": t.item_id, "batch": t.batch_id, "batch_size": len(t.members),
                "position": t.position, "recorded_batch_size": t.recorded_batch_size,
                "device": self.device, "dtype": self.dtype, "recorded_device": t.recorded_device,
                "init": None if init is None else init.to_json(),
                "passed": self.passed, **asdict(self.comparison)}

    def summary(self) -> str:
        """The outcome in one line for people."""
        t, c = self.target, self.comparison
        how = (f"in its batch {t.batch_id} (position {t.position} of {len(t.members)})"
               if t.batch_id is not None else "alone")
        where = f"regenerated {how} on {self.device} ({self.dtype})"
        if c.identical:
            return f"item {t.item_id}: identical pixels, {where}"
        difference = (f"largest difference {c.max_difference} level(s) in "
                      f"{c.differing_pixels} of {c.pixels} pixels, {where}")
        if self.passed:
            return (f"item {t.item_id}: within one level of the stored image ({difference}); "
                    f"it was made in a batch of {t.recorded_batch_size}, and {WHY_ALONE_DIFFERS}; "
                    f"`sdq reproduce {t.item_id}` replays that batch for identical pixels")
        return (f"item {t.item_id}: differs, {difference}; recorded on "
                f"{t.recorded_device or 'an unknown device'}")


def target(session: Session, item_id: int, *, alone: bool, model_ref: str | None,
           lora_dirs: Sequence[Path] = (), embeddings_dir: Path | None = None) -> Target:
    """What reproducing `item_id` regenerates: its recorded batch, or the image `alone`;
    ReproduceError when there is nothing to compare with or no model to load, MissingAdapter
    when a LoRA or embedding it was made with is not in `lora_dirs` / `embeddings_dir`."""
    item = get_item(session, item_id)
    if item.status is not Status.DONE or not item.image_key:
        dropped = ", dropped by the safety checker" if item.safety_action == "dropped" else ""
        raise ReproduceError(f"item {item_id} has no stored image "
                             f"(status {item.status.value}{dropped})")
    if item.safety_action == "blacked":
        raise ReproduceError(f"item {item_id}'s stored image was blacked out by the safety "
                             "checker: there is nothing to compare with")
    if item.model is None:
        raise ReproduceError(f"item {item_id} records no model")
    source = model_ref or item.model.source_uri
    if not source:
        raise ReproduceError(f"model {short_hash(item.model.sha256)} has no recorded source; "
                             "pass --model with a local copy")
    members = composition(session, item, in_batch=not alone)
    check_adapters(members, lora_dirs, embeddings_dir)
    recorded_size = (len(members) if not alone else
                     len(batch_items(session, item.batch_id)) if item.batch_id is not None else None)
    return Target(item_id, [member.params for member in members], members.index(item),
                  None if alone else item.batch_id, recorded_size, item.model.sha256, source,
                  item.image_key, item.device, [lora_set(member) for member in members],
                  [InitImage.of(member) for member in members])


def check_model(pipe: Pipeline, t: Target) -> None:
    """ReproduceError unless the loaded model has the weights the item was made with."""
    if pipe.sha256 != t.model_sha256:
        raise ReproduceError(f"{t.source} is model {pipe.short_hash}, item {t.item_id} was made "
                             f"with {short_hash(t.model_sha256)}; pass --model with that model")


def replay(pipe: Pipeline, t: Target, stored_png: bytes,
           starts: Sequence[Init | None] = ()) -> Outcome:
    """Regenerate `t` on `pipe`, its img2img members from `starts` (`Target.starts`), and
    compare its image with the stored one."""
    check_model(pipe, t)
    if any(t.inits) and len(starts) != len(t.members):
        raise ValueError(f"item {t.item_id}'s batch has image-to-image members: pass their "
                         "starts (Target.starts)")
    regenerated = regenerate(pipe, t.members, t.loras, starts)[t.position]
    return Outcome(t, compare(stored_png, regenerated), pipe.device, pipe.dtype)


def composition(session: Session, item: Item, *, in_batch: bool) -> list[Item]:
    """The items to regenerate together: `item` alone, or its recorded batch, checked to be
    whole (positions 0..n-1) and of one shape."""
    if not in_batch:
        return [item]
    if item.batch_id is None:
        raise ReproduceError(f"item {item.id} records no batch; --alone regenerates it by itself")
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
    before the model is loaded, without torch. MissingAdapter names the first that is not.
    Each file is hashed once, however many of the batch's items name it."""
    @cache
    def lora_sha256(name: str) -> str:
        return describe_lora(find_lora(name, lora_dirs), name).sha256

    files = list(embedding_files(embeddings_dir)) if embeddings_dir else []

    @cache
    def embedding_sha256s(name: str) -> list[str]:
        return [file_sha256(p) for p in files if p.stem == name]

    for item in items:
        for lora in item.loras or ():
            name, sha256 = lora["name"], lora["sha256"]
            try:
                found = lora_sha256(name)
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
            if embedding_sha256s(name) != [sha256]:
                where = f"in {embeddings_dir}" if embeddings_dir else "(no embeddings folder)"
                raise MissingAdapter(f"item {item.id} was made with embedding {name} (sha256 "
                                     f"{sha256[:12]}), which is not {where} with that hash; pass "
                                     "--embeddings-dir with the folder that holds it")


LoraSet = list[tuple[str, float, str]]
"""One image's LoRAs as `produce` takes them: (name, weight, sha256)."""


def lora_set(item: Item) -> LoraSet:
    return [(r["name"], r["weight"], r["sha256"]) for r in item.loras or ()]


def regenerate(pipe: Pipeline, params: Sequence[GenerationParams],
               loras: Sequence[LoraSet] = (), starts: Sequence[Init | None] = ()
               ) -> list[Image.Image]:
    """The unmarked images of `params` (with their `loras`, and img2img `starts`), denoised as
    one batch in the given order (split in halves only if the device runs out of memory:
    `produce`)."""
    images: list[Image.Image] = []
    for produced in produce(pipe, params, batch_size=len(params),
                            loras=list(loras) if any(loras) else None,
                            inits=list(starts) if any(starts) else None):
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

