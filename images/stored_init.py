"""Init images as workers and `sdq reproduce` read them: from storage, under `init_key(sha256)`,
never from the machine that submitted the job.

The object's bytes are hashed before they are decoded: an object whose sha256 is not the one
the item records (overwritten, damaged in transit) would make another image under the record
of this one, so it is refused like a missing or undecodable one, with a reason that names the
init image by its short hash (`init image 1a2b3c4d5e: ...`). Storage that cannot be reached is
not such a failure: `StorageError` (other than `ObjectNotFound`) reaches the caller, whose
outage policy waits it out.

A nightly job starts many seeds and strengths from one init image, so `InitImages` keeps the
decoded images of the last few by sha256, within a memory budget: one download and one decode
per init image per worker, not per item.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict

from PIL import Image

from sdq.core.errors import InvalidInput
from sdq.core.params import short_hash

from .imagefile import ImageFileError, init_rgb, open_image
from .storage import ObjectNotFound, Storage, init_key

CACHE_BYTES = 256 * 1024 * 1024
"""Decoded RGB bytes `InitImages` keeps at most (ten 4K photos, or over three hundred 512x512
images); one larger than this is used without being kept."""


class UnusableInit(InvalidInput):
    """An init image that is not in storage, or not as recorded: `init image SHORT: reason`.
    Retrying cannot help, so the items that start from it fail with this reason."""

    def __init__(self, sha256: str, reason: str) -> None:
        self.sha256, self.reason = sha256, reason
        super().__init__(f"init image {short_hash(sha256)}: {reason}")


def read_stored_init(storage: Storage, sha256: str) -> Image.Image:
    """The init image stored under `init_key(sha256)`, checked against its sha256, decoded
    (`open_image`, with its pixel cap) and made RGB as diffusers does (`init_rgb`).
    UnusableInit when it is missing, altered or not a readable image; StorageError when
    storage fails."""
    key = init_key(sha256)
    try:
        data = storage.get(key)
    except ObjectNotFound:
        raise UnusableInit(sha256, f"not in storage (no object {key}); was it purged, or "
                                   "submitted to another store?") from None
    found = hashlib.sha256(data).hexdigest()
    if found != sha256:
        raise UnusableInit(sha256, f"the stored object {key} has sha256 {short_hash(found)}, "
                                   "not the one recorded: it was altered after submission")
    try:
        return init_rgb(open_image(data, key), key)
    except ImageFileError as exc:
        raise UnusableInit(sha256, exc.reason) from None


class InitImages:
    """Stored init images by sha256, each read once and kept, the most recently used first,
    while they fit in `budget` decoded bytes. Not thread-safe: one runner's generating thread
    uses it."""

    def __init__(self, storage: Storage, budget: int = CACHE_BYTES) -> None:
        self.storage, self.budget = storage, budget
        self._images: OrderedDict[str, Image.Image] = OrderedDict()
        self._bytes = 0
        """The decoded bytes of `_images`, kept as they change."""
        self.reads = 0
        """Objects read from storage so far (a cached image costs none)."""

    def get(self, sha256: str) -> Image.Image:
        """The init image `sha256` (`read_stored_init`), from memory when it was read lately."""
        if sha256 in self._images:
            self._images.move_to_end(sha256)
            return self._images[sha256]
        image = read_stored_init(self.storage, sha256)
        self.reads += 1
        size = _nbytes(image)
        if size <= self.budget:
            while self._images and self._bytes + size > self.budget:
                self._bytes -= _nbytes(self._images.popitem(last=False)[1])
            self._images[sha256] = image
            self._bytes += size
        return image

    def __len__(self) -> int:
        return len(self._images)


def _nbytes(image: Image.Image) -> int:
    return image.width * image.height * len(image.getbands())
