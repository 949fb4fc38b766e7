"""Dataset exports of finished images with their prompts and provenance, for training.

Formats:
- `webdataset`: tar shards `{prefix}-{n:06d}.tar`, each item as `{key}.png`, `{key}.txt` (the
  prompt) and `{key}.json` (its record), the layout the `webdataset` loader groups by key;
- `parquet`: shards `{prefix}-{n:06d}.parquet`, one row per item: `image` (a struct of PNG
  `bytes` and `path`, as Hugging Face `datasets` stores images), `prompt`, the record's
  fields as columns and the whole record as JSON (`provenance`); needs pyarrow;
- `imagefolder`: `images/{key}.png` and one `metadata.jsonl` with a `file_name` column, the
  Hugging Face imagefolder convention; a shard is here a group of images.

The key is the item id, zero-padded, so names sort in id order. Shard membership is decided
by item id order alone (shard n holds the n-th `shard_size` ids), and the plan is written
first to `{prefix}-manifest.json`. A rerun skips a shard that exists and whose planned ids
are unchanged; each shard is written whole or not at all (a local temp file, then an atomic
put), so an existing shard is a complete one. Files of an earlier plan that the new one does
not make (the selection shrank) are deleted.
"""
from __future__ import annotations

import io
import json
import tarfile
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from sdq.db.models import Item, Status
from sdq.db.queries import search_items
from sdq.sdmodel.errors import Refused
from sdq.worker.images.storage import ObjectNotFound, Storage

FORMATS = ("webdataset", "parquet", "imagefolder")
Describe = Callable[[Item], Mapping[str, Any]]
_PAGE = 1000


class ExportError(Refused):
    """The export cannot be completed as asked (a missing image, a missing extra)."""


@dataclass(frozen=True)
class ExportReport:
    items: int
    shards: int
    written: int
    skipped: int


def select_item_ids(session: Session, *, job_id: int | None = None, text: str | None = None
                    ) -> list[int]:
    """The finished items with an image, of a job and/or matching a prompt search, by id."""
    if text is None:
        stmt = (select(Item.id).where(Item.status == Status.DONE, Item.image_key.is_not(None))
                .order_by(Item.id))
        if job_id is not None:
            stmt = stmt.where(Item.job_id == job_id)
        return list(session.scalars(stmt))
    ids: list[int] = []
    before = None
    while True:
        page = search_items(session, text=text, job_id=job_id, status=Status.DONE,
                            before=before, limit=_PAGE)
        ids.extend(item.id for item in page.items if item.image_key)
        if page.next_before is None:
            return sorted(ids)
        before = page.next_before


def plan_shards(ids: Sequence[int], shard_size: int) -> list[list[int]]:
    if shard_size < 1:
        raise ValueError(f"shard size must be at least 1, got {shard_size}")
    ordered = sorted(ids)
    return [ordered[i:i + shard_size] for i in range(0, len(ordered), shard_size)]


def export_items(
    session: Session, source: Storage, dest: Storage, ids: Sequence[int], *, fmt: str,
    describe: Describe, shard_size: int = 1000, prefix: str = "shard",
    on_item: Callable[[int], None] | None = None,
) -> ExportReport:
    """Write the items `ids` (images read from `source`) to `dest` in format `fmt`, skipping
    the shards a previous run of the same plan wrote. `describe(item)` is the record that
    goes with each image (JSON-able, datetimes and enums allowed). `on_item(n)` after n items
    are done (written or skipped). Raises ExportError, or the storage's StorageError."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
    writer = _WRITERS[fmt]()
    shards = plan_shards(ids, shard_size)
    manifest_key = f"{prefix}-manifest.json"
    previous = _read_manifest(dest, manifest_key, fmt)
    dest.put(manifest_key, json.dumps({"format": fmt, "shard_size": shard_size,
                                       "shards": shards}).encode(), content_type="application/json")
    planned = {key for n, shard in enumerate(shards) for key in writer.keys(prefix, n, shard)}
    for n, shard in enumerate(previous):
        for key in set(writer.keys(prefix, n, shard)) - planned:
            dest.delete(key)
    written = skipped = 0
    for n, shard in enumerate(shards):
        keys = writer.keys(prefix, n, shard)
        if n < len(previous) and previous[n] == shard and all(dest.exists(k) for k in keys):
            skipped += 1
        else:
            items = list(session.scalars(select(Item).where(Item.id.in_(shard)).order_by(Item.id)))
            # One image in memory at a time (parquet gathers its shard's rows regardless).
            writer.write(dest, prefix, n, ((item, _image(source, item), describe(item))
                                           for item in items))
            written += 1
        if on_item:
            on_item(len(shard))
    writer.finish(session, dest, shards, describe)
    return ExportReport(len(ids), len(shards), written, skipped)


def _read_manifest(dest: Storage, key: str, fmt: str) -> list[list[int]]:
    try:
        manifest = json.loads(dest.get(key))
    except ObjectNotFound:
        return []
    except ValueError:
        raise ExportError(f"{key} in the destination is not an export manifest") from None
    if manifest.get("format") != fmt:
        raise ExportError(f"the destination holds a {manifest.get('format')} export; "
                          f"export {fmt} elsewhere or use another --prefix")
    return [list(shard) for shard in manifest["shards"]]


def _image(source: Storage, item: Item) -> bytes:
    try:
        return source.get(item.image_key or "")
    except ObjectNotFound:
        raise ExportError(f"item {item.id}: image {item.image_key} is missing from storage "
                          "(`sdq verify` checks a job's images)") from None


def item_key(item_id: int) -> str:
    return f"{item_id:010d}"


def _json(record: Mapping[str, Any]) -> str:
    def plain(value: Any) -> Any:
        if isinstance(value, datetime):
            return value.isoformat(timespec="seconds")
        if isinstance(value, Enum):
            return value.value
        raise TypeError(f"cannot write {type(value).__name__} as JSON")
    return json.dumps(record, default=plain, ensure_ascii=False)


Entry = tuple[Item, bytes, Mapping[str, Any]]


class _Writer:
    """One format: which keys a shard makes, how to write one, what to write at the end."""

    def keys(self, prefix: str, n: int, ids: Sequence[int]) -> list[str]:
        raise NotImplementedError

    def write(self, dest: Storage, prefix: str, n: int, entries: Iterable[Entry]) -> None:
        raise NotImplementedError

    def finish(self, session: Session, dest: Storage, shards: list[list[int]],
               describe: Describe) -> None:
        """Anything written once for the whole export (nothing for most formats)."""


def _upload(dest: Storage, key: str, fill: Callable[[Path], None], content_type: str) -> None:
    """Build a shard in a local temp file, then put it whole: readers never see half of it."""
    with tempfile.TemporaryDirectory(prefix="sdq-export-") as folder:
        path = Path(folder) / "shard"
        fill(path)
        dest.put_file(key, path, content_type=content_type)


class _WebDataset(_Writer):
    def keys(self, prefix: str, n: int, ids: Sequence[int]) -> list[str]:
        return [f"{prefix}-{n:06d}.tar"]

    def write(self, dest: Storage, prefix: str, n: int, entries: Iterable[Entry]) -> None:
        def fill(path: Path) -> None:
            with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
                for item, png, record in entries:
                    key = item_key(item.id)
                    for suffix, data in (("png", png), ("txt", item.prompt.encode()),
                                         ("json", _json(record).encode())):
                        info = tarfile.TarInfo(f"{key}.{suffix}")
                        info.size, info.mode = len(data), 0o644
                        info.mtime = int(item.finished_at.timestamp()) if item.finished_at else 0
                        tar.addfile(info, io.BytesIO(data))
        _upload(dest, self.keys(prefix, n, [])[0], fill, "application/x-tar")


class _Parquet(_Writer):
    def __init__(self) -> None:
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise ExportError("the parquet format needs pyarrow: pip install 'sdq[export]'") \
                from None

    def keys(self, prefix: str, n: int, ids: Sequence[int]) -> list[str]:
        return [f"{prefix}-{n:06d}.parquet"]

    def write(self, dest: Storage, prefix: str, n: int, entries: Iterable[Entry]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        rows = []
        for item, png, record in entries:
            flat = json.loads(_json(record))
            columns = {k: v for k, v in flat.items() if not isinstance(v, (list, dict))}
            rows.append({"key": item_key(item.id),
                         "image": {"bytes": png, "path": f"{item_key(item.id)}.png"},
                         **columns, "prompt": item.prompt, "provenance": _json(record)})
        table = pa.Table.from_pylist(rows)
        _upload(dest, self.keys(prefix, n, [])[0], lambda path: pq.write_table(table, path),
                "application/vnd.apache.parquet")


class _ImageFolder(_Writer):
    def keys(self, prefix: str, n: int, ids: Sequence[int]) -> list[str]:
        return [f"images/{item_key(i)}.png" for i in ids]

    def write(self, dest: Storage, prefix: str, n: int, entries: Iterable[Entry]) -> None:
        for item, png, _ in entries:
            dest.put(f"images/{item_key(item.id)}.png", png)

    def finish(self, session: Session, dest: Storage, shards: list[list[int]],
               describe: Describe) -> None:
        """`metadata.jsonl` for every image, rewritten whole from the records."""
        lines = []
        for shard in shards:
            for item in session.scalars(select(Item).where(Item.id.in_(shard)).order_by(Item.id)):
                record = {"file_name": f"images/{item_key(item.id)}.png", **describe(item)}
                lines.append(_json(record) + "\n")
        dest.put("metadata.jsonl", "".join(lines).encode(), content_type="application/jsonl")


_WRITERS: dict[str, Callable[[], _Writer]] = {
    "webdataset": _WebDataset, "parquet": _Parquet, "imagefolder": _ImageFolder,
}
