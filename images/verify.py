"""Is this image what sdq says it made? A PNG is checked against itself (`provenance.verify_png`)
and, when the index knows the item it names, against the item's record.

An item verified by id is read from storage, and so is the init image an image-to-image item
started from: it must still be stored under its sha256 and decode, or the image can no longer
be made again (`sdq reproduce`).

A file is verified wherever it is, so the index is optional: a database that cannot answer
(or, for SQLite, does not exist: verifying a downloaded image on a machine that never ran sdq
must leave no database behind) only skips the comparison with the record.
"""
from __future__ import annotations

from pathlib import Path

from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from sdq.core.errors import CheckFailed, NotFound, Unavailable
from sdq.db.models import Item
from sdq.db.session import SchemaMismatch, open_database

from .provenance import Check, ItemRecord, Verification, read_png_metadata, verify_png
from .storage import Storage
from .stored_init import UnusableInit, read_stored_init


class _Unavailable(Exception):
    """The database cannot answer; a file is still verified on its own."""


def _find_item(database_url: str, item_id: int) -> tuple[ItemRecord, str | None, str] | None:
    """(record, image key, status), or None when the database has no such item."""
    url = make_url(database_url)
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:" \
            and not Path(url.database).expanduser().is_file():
        raise _Unavailable(f"no database at {url.database}")
    try:
        engine = open_database(url)
    except (SQLAlchemyError, SchemaMismatch, ValueError) as exc:
        raise _Unavailable(str(exc).splitlines()[0]) from None
    try:
        with Session(engine) as session:
            item = session.get(Item, item_id)
            if item is None:
                return None
            status = item.status.value
            if item.safety_action == "dropped":
                status += ", image dropped by the safety checker"
            return ItemRecord.of(item), item.image_key, status
    except SQLAlchemyError as exc:
        raise _Unavailable(str(exc).splitlines()[0]) from None
    finally:
        engine.dispose()


def verify_file(path: Path, database_url: str) -> tuple[Verification, Check | None]:
    """Verify a file, against the database when it knows the item the file names; the check
    that was skipped, and why, when it could not be compared."""
    data = path.read_bytes()
    provenance = read_png_metadata(data).provenance
    if provenance is None or provenance.item_id is None:
        return verify_png(data), Check("database", None, "the file names no item")
    try:
        found = _find_item(database_url, provenance.item_id)
    except _Unavailable as exc:
        return verify_png(data), Check("database", None, str(exc))
    if found is None:
        return verify_png(data), Check("database", None,
                                       f"the database has no item {provenance.item_id}")
    return verify_png(data, found[0]), None


def stored_image(database_url: str, item_id: int) -> tuple[ItemRecord, str]:
    """The record of an item and the key of its stored image, to verify that image by: the
    database must answer (Unavailable), know the item (NotFound) and have its image
    (CheckFailed: none yet, or dropped)."""
    try:
        found = _find_item(database_url, item_id)
    except _Unavailable as exc:
        raise Unavailable(f"item {item_id}: {exc}") from None
    if found is None:
        raise NotFound(f"no item {item_id} in the database")
    record, key, status = found
    if key is None:
        raise CheckFailed(f"item {item_id} has no image yet (status: {status})")
    return record, key


def verify_item(storage: Storage, database_url: str, item_id: int) -> Verification:
    """Verify an item's stored image against its record (`stored_image`), and for an
    image-to-image item that its init image is still stored as recorded."""
    record, key = stored_image(database_url, item_id)
    result = verify_png(storage.get(key), record)
    if record.init is None:
        return result
    try:
        image = read_stored_init(storage, record.init.sha256)
    except UnusableInit as exc:
        check = Check("init image", False, f"{exc.reason}: the image cannot be made again")
    else:
        check = Check("init image", True, f"stored, sha256 {record.init.sha256[:16]}..., "
                                          f"{image.width}x{image.height}, strength "
                                          f"{record.init.strength:g}")
    return Verification(result.metadata, result.watermark_ber, (*result.checks, check))
