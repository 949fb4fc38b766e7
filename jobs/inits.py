"""Init images at submit: each one a prompt file or `--init-dir` names is read once and
checked, then stored once by content and recorded in `init_images`.

Sources: a local file (relative to the prompt file's folder), `s3://BUCKET/KEY` in the
configured storage's bucket (under its prefix), or `item:ID`, the stored image of an item. Each
is decoded as img2img will use it (`imagefile.open_image`, its pixel cap, then `init_rgb`), so
a truncated file, a non-image or a decompression bomb is a problem of its line before anything
is recorded; its own size (EXIF orientation applied) is what an item without a width or height
is made at.

Storing, in this order, so that a failure never leaves an item without its init image:

1. `upload`, before any row is written: each distinct image is put under
   `storage.init_key(sha256)` unless that object is there. An object without a row is harmless
   (it names its own content) and is found there the next time.
2. `record`, in the transaction that inserts the items: each `init_images` row is locked (or
   inserted, which locks it), one sha256 after the other in sorted order, and where this
   submission inserted the row the object is checked again under that lock and put back if it
   is gone. Both databases: on SQLite every transaction holds the write lock from its start
   (`db.session`); on PostgreSQL the row lock orders this against a purge.

`jobs.maintenance` deletes an init image (row and object) with the last item that points at
it, holding the same row lock while it deletes the object, before its commit. So a committed
row always has its object: a submit that locked an existing row finds the object there, and one
that waited on a purge finds the row gone, inserts it and puts the object back.
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from sdq.core.errors import InvalidInput
from sdq.core.params import ParamError
from sdq.db.models import InitImageFile, Item
from sdq.images.storage import S3Storage, Storage, StorageError, check_key, init_key

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
"""The files `--init-dir` takes; others there (a README, `.DS_Store`) are skipped and counted."""
FIELD = "init_image"
MAX_REF_CHARS = 1024
"""The longest `init_image` cell: a path, an `s3://` URL or `item:ID`."""


@dataclass(frozen=True)
class InitSource:
    """One init image as read at submit: the sha256 of its bytes, the name items record
    (`init_source`), its own size (EXIF orientation applied), and how to read it again to
    store it (the bytes are not held: a folder of photos would fill memory)."""

    sha256: str
    source: str
    width: int
    height: int
    size_bytes: int
    content_type: str
    read: Callable[[], bytes] = field(compare=False, repr=False)


def checked(data: bytes, label: str, source: str, read: Callable[[], bytes]) -> InitSource:
    """The InitSource of bytes decoded as img2img will decode them; ImageFileError if they
    are no image sdq will use. (PIL is imported here, not with the module: prompt files
    without init images, which import this, need none of it.)"""
    from PIL import Image

    from sdq.images.imagefile import init_rgb, open_image

    image = open_image(data, label)
    width, height = init_rgb(image, label).size
    return InitSource(hashlib.sha256(data).hexdigest(), source, width, height, len(data),
                      Image.MIME.get(image.format or "", "application/octet-stream"), read)


ItemImage = Callable[[int], str]
"""An item id to the storage key of its image; LookupError saying why there is none."""


def item_images(session: Session) -> ItemImage:
    """`item:ID` sources as the database knows them: a finished item's stored image."""
    def key(item_id: int) -> str:
        found = session.execute(select(Item.image_key, Item.status).where(Item.id == item_id)).first()
        if found is None:
            raise LookupError(f"no item {item_id}")
        if found.image_key is None:
            raise LookupError(f"item {item_id} has no stored image (it is {found.status})")
        return found.image_key
    return key


class InitReader:
    """Reads the init images of one submission, each named source once. `base` is the folder
    local paths are relative to (the prompt file's); `storage` the configured store (opened
    on first need) that `s3://` and `item:ID` sources are read from; `item_image` finds items."""

    def __init__(self, base: Path | str = ".", *, storage: Callable[[], Storage] | None = None,
                 item_image: ItemImage | None = None) -> None:
        self.base = Path(base)
        self._storage = storage
        self._store: Storage | None = None
        self._item_image = item_image
        self._seen: dict[str, InitSource | str] = {}

    def read(self, ref: str) -> InitSource:
        """The source `ref` names, read and checked; ParamError naming `init_image`."""
        if ref not in self._seen:
            try:
                self._seen[ref] = self._read(ref)
            except (LookupError, InvalidInput, StorageError) as exc:  # InvalidInput: ImageFileError too
                self._seen[ref] = str(exc)
        found = self._seen[ref]
        if isinstance(found, str):
            raise ParamError(FIELD, found)
        return found

    def _read(self, ref: str) -> InitSource:
        if ref.startswith("s3://"):
            return self._stored(ref, self._s3_key(ref))
        if ref.startswith("item:"):
            number = ref.removeprefix("item:")
            if not number.isdigit():
                raise InvalidInput(f"{ref}: expected item:ID, an item's number")
            if self._item_image is None:
                raise InvalidInput(f"{ref}: items are not known here")
            return self._stored(ref, self._item_image(int(number)))
        path = self.base / Path(ref).expanduser()
        return read_path(path, ref)

    def _stored(self, ref: str, key: str) -> InitSource:
        store = self.storage(ref)
        data = store.get(key)
        return checked(data, ref, ref, lambda: store.get(key))

    def storage(self, ref: str) -> Storage:
        """The configured storage, opened once; InvalidInput naming `ref` without one."""
        if self._store is None:
            if self._storage is None:
                raise InvalidInput(f"{ref}: no storage is configured to read it from")
            self._store = self._storage()
        return self._store

    def _s3_key(self, ref: str) -> str:
        """The storage key of an `s3://BUCKET/KEY` URL, which must be in the configured
        bucket, under its prefix: sdq reads no other bucket (no credentials of its own for
        it, and a job would depend on an object it does not control)."""
        url = urlparse(ref)
        store = self.storage(ref)
        if not isinstance(store, S3Storage):
            raise InvalidInput(f"{ref}: the configured storage is a folder ({store}), not S3; "
                               "give a local path instead")
        root = f"{store.prefix}/" if store.prefix else ""
        if url.netloc != store.bucket or not url.path.lstrip("/").startswith(root):
            raise InvalidInput(f"{ref}: not in the configured storage ({store}); sdq reads "
                               "init images from that bucket and prefix only")
        try:
            return check_key(url.path.lstrip("/")[len(root):])
        except ValueError as exc:
            raise InvalidInput(f"{ref}: {exc}") from None


def read_path(path: Path, source: str) -> InitSource:
    """A local init image file (ImageFileError naming `source`)."""
    from sdq.images.imagefile import read_file

    data = read_file(path, source)
    return checked(data, source, source, lambda: read_file(path, source))


@dataclass(frozen=True)
class InitDir:
    """The images of an `--init-dir`, by file name, and what was skipped there."""

    images: list[InitSource]
    skipped: int


class InitDirError(InvalidInput):
    """Images of an `--init-dir` refused, each as `DIR/NAME: init_image: reason`."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


def read_init_dir(folder: Path, label: str | None = None) -> InitDir:
    """Every image file of `folder` (not its subfolders), sorted by name, each recorded under
    its file name; hidden files and names without an image suffix (IMAGE_SUFFIXES) are
    skipped and counted, a file with one that is no usable image is refused (InitDirError
    listing them all), as is a folder with no image. A name that is not UTF-8 is recorded
    with its bytes escaped (`promptfile.recorded_name`), as every database stores it."""
    from sdq.images.imagefile import ImageFileError
    from sdq.jobs.promptfile import recorded_name  # here: promptfile imports this module

    label = label or str(folder)
    try:
        entries = sorted(folder.iterdir(), key=lambda p: p.name)
    except OSError as exc:
        raise InitDirError([f"{label}: {FIELD}: cannot read the folder: {exc.strerror or exc}"]) from None
    images, problems, skipped = [], [], 0
    for path in entries:
        if path.name.startswith(".") or path.suffix.lower() not in IMAGE_SUFFIXES \
                or path.is_dir():
            skipped += 1
            continue
        try:
            images.append(read_path(path, recorded_name(path.name)))
        except ImageFileError as exc:
            problems.append(f"{label.rstrip('/')}/{recorded_name(path.name)}: {FIELD}: {exc.reason}")
    if not images and not problems:
        problems.append(f"{label}: {FIELD}: no image files (names ending in "
                        f"{', '.join(IMAGE_SUFFIXES)})")
    if problems:
        raise InitDirError(problems)
    return InitDir(images, skipped)


def distinct(inits: Iterable[InitSource]) -> dict[str, InitSource]:
    """One source per sha256 (the first named): the same bytes are stored once."""
    found: dict[str, InitSource] = {}
    for init in inits:
        found.setdefault(init.sha256, init)
    return found


def upload(storage: Storage, inits: Iterable[InitSource]) -> int:
    """Step 1 (see the module): put each image not stored yet under its `init_key`; how many
    were put. StorageError, or InvalidInput when a file changed since it was read."""
    put = 0
    for init in distinct(inits).values():
        if not storage.exists(init_key(init.sha256)):
            _put(storage, init)
            put += 1
    return put


def _put(storage: Storage, init: InitSource) -> None:
    data = init.read()
    if hashlib.sha256(data).hexdigest() != init.sha256:
        raise InvalidInput(f"{init.source}: {FIELD}: the file changed while the job was "
                           "submitted; submit again")
    storage.put(init_key(init.sha256), data, content_type=init.content_type)


def record(session: Session, storage: Storage, inits: Iterable[InitSource]) -> None:
    """Step 2 (see the module), in the caller's transaction: lock or insert each image's row,
    in sha256 order, putting the object back where this inserted the row and it is gone."""
    for sha256, init in sorted(distinct(inits).items()):
        while session.scalar(select(InitImageFile.sha256).where(InitImageFile.sha256 == sha256)
                             .with_for_update()) is None:
            try:
                with session.begin_nested():
                    session.add(InitImageFile(sha256=sha256,
                                              width=init.width, height=init.height,
                                              size_bytes=init.size_bytes))
            except IntegrityError:
                continue  # another submit inserted it meanwhile: lock theirs
            if not storage.exists(init_key(sha256)):
                _put(storage, init)
            break

