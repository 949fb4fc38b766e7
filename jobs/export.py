"""Dataset exports of finished images with their prompts and provenance, for training.

Formats, each readable with one call by the usual loaders (tests/cli/test_export_readers.py),
every field with one type whatever the values (a list empty or a field null throughout loads
with the type it has where it is set), so that exports of different days concatenate:
- `webdataset`: tar shards `{prefix}-{n:06d}.tar`, each item as `{key}.png`, `{key}.txt` (the
  prompt) and `{key}.json` (its record), the layout the `webdataset` loader groups by key, and
  at the top a hidden `.huggingface.yaml` declaring the Hugging Face `datasets` features
  (`datasets` reads it with `load_dataset(folder)`; it would otherwise guess the types of the
  JSON from the first five samples);
- `parquet`: shards `{prefix}-{n:06d}.parquet`, one row per item: `image` (a struct of PNG
  `bytes` and `path`, declared a Hugging Face `Image` so `datasets` decodes it), the record's
  fields as typed columns and the whole record as JSON (`provenance`). One Arrow schema,
  declared here, for every shard of every export, so shards of different jobs read as one
  table (pyarrow, a dependency of sdq);
- `imagefolder`: `images/{key}.png` and one `metadata.parquet` with a `file_name` column, the
  Hugging Face imagefolder convention; a parquet file, not `metadata.jsonl`, because its schema
  carries the types (a JSON Lines file's are guessed from its values). A shard is here a
  group of images.

Every format holds the same typed record (`typed_record`): enums as their values and
`template_values` as JSON text.

With a dataset card (`card=True`) the layout is a Hugging Face hub dataset's: `README.md`
(see `sdq.jobs.card`) at the top, the files above under `data/`, since folder readers
such as `pyarrow.parquet.read_table(folder)` would try to read the card as data.

The key is the item id, zero-padded, so names sort in id order. Shard membership is decided
by item id order alone (shard n holds the n-th `shard_size` ids), and the plan is written
first to `.{prefix}-manifest.json`: hidden, because pyarrow, pandas and Hugging Face
`datasets` skip dot-files in a folder and would otherwise fail on it. A rerun skips a shard
that exists and whose planned ids are unchanged; each shard is written whole or not at all (a
local temp file, then an atomic put), so an existing shard is a complete one. Files of an
earlier plan that the new one does not make (the selection shrank, the layout changed) are
deleted.

Over 400 lines on purpose: three writers behind one interface, with the resumable shard
plan and the transaction handling they share.
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

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from sdq.core.errors import InvalidInput, Refused
from sdq.db.models import Item, Job, Status
from sdq.db.queries import search_items
from sdq.images.storage import ObjectNotFound, Storage, inside
from sdq.jobs.card import dataset_card, declared_features

FORMATS = ("webdataset", "parquet", "imagefolder")
Describe = Callable[[Item], Mapping[str, Any]]
_PAGE = 1000
HF_YAML = ".huggingface.yaml"
"""The YAML that `datasets` reads beside a dataset's README.md (and merges over its front
matter) when loading a folder: hidden, so pyarrow, pandas and `webdataset` skip it."""


class ExportError(Refused):
    """The export cannot be completed as asked (a missing image, a missing extra)."""


@dataclass(frozen=True)
class ExportReport:
    items: int
    shards: int
    written: int
    skipped: int


def select_item_ids(session: Session, *, job_id: int | None = None, text: str | None = None,
                    exclude_flagged: bool = False, schedule_id: int | None = None) -> list[int]:
    """The finished items with an image, of a job and/or matching a prompt search, by id; or
    those of every run of a schedule, one per image (a run that reused an image of an earlier
    run adds its row, not a second copy: the first row of each image is exported). With
    `exclude_flagged`, without those the safety checker flagged (unchecked ones stay)."""
    if schedule_id is not None:
        first = (select(func.min(Item.id)).join(Job, Item.job_id == Job.id)
                 .where(Job.schedule_id == schedule_id, Item.status == Status.DONE,
                        Item.image_key.is_not(None)).group_by(Item.image_key))
        if exclude_flagged:
            first = first.where(Item.safety_flagged.is_not(True))
        return sorted(session.scalars(first))
    if text is None:
        stmt = (select(Item.id).where(Item.status == Status.DONE, Item.image_key.is_not(None))
                .order_by(Item.id))
        if job_id is not None:
            stmt = stmt.where(Item.job_id == job_id)
        if exclude_flagged:
            stmt = stmt.where(Item.safety_flagged.is_not(True))
        return list(session.scalars(stmt))
    ids: list[int] = []
    before = None
    while True:
        page = search_items(session, text=text, job_id=job_id, status=Status.DONE,
                            before=before, limit=_PAGE)
        ids.extend(item.id for item in page.items
                   if item.image_key and not (exclude_flagged and item.safety_flagged))
        if page.next_before is None:
            return sorted(ids)
        before = page.next_before


def plan_shards(ids: Sequence[int], shard_size: int) -> list[list[int]]:
    if shard_size < 1:
        raise ValueError(f"shard size must be at least 1, got {shard_size}")
    ordered = sorted(ids)
    return [ordered[i:i + shard_size] for i in range(0, len(ordered), shard_size)]


def check_format(fmt: str) -> None:
    """ExportError when the library that writes `fmt` (pyarrow, for parquet and imagefolder's
    metadata) is missing, for a command to call before any work starts. pyarrow is one of
    sdq's dependencies, but an environment assembled by hand (or a wheel installed with
    --no-deps) can lack it."""
    if fmt == "webdataset":
        return
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        raise ExportError(f"the {fmt} format needs pyarrow, which this environment lacks: "
                          "pip install 'pyarrow>=14'") from None


def export_items(
    session: Session, source: Storage, dest: Storage, ids: Sequence[int], *, fmt: str,
    describe: Describe, shard_size: int = 1000, prefix: str = "shard", card: bool = False,
    origin: Sequence[str] = (), on_item: Callable[[int], None] | None = None,
) -> ExportReport:
    """Write the items `ids` (images read from `source`) to `dest` in format `fmt`, skipping
    the shards a previous run of the same plan wrote; with `card`, a dataset card too.
    `describe(item)` is the record that goes with each image (JSON-able, datetimes and enums
    allowed). `on_item(n)` after n items are done (written or skipped). Raises ExportError,
    or the storage's StorageError."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
    if inside(dest, source) or inside(source, dest):
        # A parent too: an imagefolder export writes `images/`, which may be the store itself.
        where = "inside" if inside(dest, source) else "a parent of"
        raise InvalidInput(f"{dest} is {where} the image store {source}: shards there would "
                           "sit among the live images; export somewhere else")
    session.rollback()  # the caller's reads: no transaction waits on storage below
    shards = plan_shards(ids, shard_size)
    folder = "data/" if card else ""
    writer = _WRITERS[fmt](folder)
    reusable = _replace_plan(dest, writer, fmt, prefix, shard_size, shards)
    written = skipped = 0
    for n, shard in enumerate(shards):
        keys = writer.keys(prefix, n, shard)
        if n < len(reusable) and reusable[n] == shard and all(dest.exists(k) for k in keys):
            skipped += 1
        else:
            rows = _read(session, shard, describe)
            # One image in memory at a time (parquet gathers its shard's rows regardless).
            writer.write(dest, prefix, n, ((item, _image(source, item), record)
                                           for item, record in rows))
            written += 1
        if on_item:
            on_item(len(shard))
    writer.finish(session, dest, shards, describe)
    if card:
        text = dataset_card(session, shards, fmt, card_features(fmt), origin)
        session.rollback()
        dest.put("README.md", text.encode(), content_type="text/markdown")
    return ExportReport(len(ids), len(shards), written, skipped)


@dataclass(frozen=True)
class _Plan:
    shards: list[list[int]]
    folder: str = ""


def _replace_plan(dest: Storage, writer: _Writer, fmt: str, prefix: str, shard_size: int,
                  shards: list[list[int]]) -> list[list[int]]:
    """Write the new plan first, delete the files of the previous plan that it does not make,
    and return the previous plan's shards that may be kept (none if the layout changed)."""
    previous, legacy = _read_manifest(dest, prefix, fmt)
    dest.put(f".{prefix}-manifest.json", json.dumps({
        "format": fmt, "shard_size": shard_size, "folder": writer.folder, "shards": shards,
    }).encode(), content_type="application/json")
    if legacy:
        dest.delete(legacy)
    planned = {*writer.common_keys(),
               *(key for n, shard in enumerate(shards) for key in writer.keys(prefix, n, shard))}
    earlier = _WRITERS[fmt](previous.folder)
    for key in {*earlier.common_keys(), *earlier.replaced_keys(), *writer.replaced_keys(),
                *(key for n, shard in enumerate(previous.shards)
                  for key in earlier.keys(prefix, n, shard))} - planned:
        dest.delete(key)
    if previous.folder == writer.folder:
        return previous.shards
    if previous.folder:  # a card's layout before: its card goes with it
        dest.delete("README.md")
    return []


def _read_manifest(dest: Storage, prefix: str, fmt: str) -> tuple[_Plan, str | None]:
    """The plan of the previous run, and the key of a manifest that earlier sdq versions
    wrote unhidden (`{prefix}-manifest.json`: read once, then replaced by the hidden one)."""
    for key in (f".{prefix}-manifest.json", f"{prefix}-manifest.json"):
        try:
            manifest = json.loads(dest.get(key))
        except ObjectNotFound:
            continue
        except ValueError:
            raise ExportError(f"{key} in the destination is not an export manifest") from None
        if manifest.get("format") != fmt:
            raise ExportError(f"the destination holds a {manifest.get('format')} export; "
                              f"export {fmt} elsewhere or use another --prefix")
        plan = _Plan([list(shard) for shard in manifest["shards"]], manifest.get("folder", ""))
        return plan, key if not key.startswith(".") else None
    return _Plan([]), None


def _read(session: Session, ids: Sequence[int], describe: Describe) -> list[tuple[Item, Any]]:
    """The items `ids` with their records, read in a transaction that ends here: downloading
    and uploading the shard (minutes on a slow store) must not hold a database session idle
    in transaction, and its locks, meanwhile. The items come back detached, their columns
    loaded."""
    items = list(session.scalars(select(Item).where(Item.id.in_(ids)).order_by(Item.id)))
    rows = [(item, describe(item)) for item in items]
    for item in items:
        session.expunge(item)
    session.rollback()
    return rows


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
    """One format, writing under `folder` ("" or "data/"): which keys a shard makes, how to
    write one, what to write at the end."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def keys(self, prefix: str, n: int, ids: Sequence[int]) -> list[str]:
        raise NotImplementedError

    def write(self, dest: Storage, prefix: str, n: int, entries: Iterable[Entry]) -> None:
        raise NotImplementedError

    def common_keys(self) -> list[str]:
        """The files `finish` writes."""
        return []

    def replaced_keys(self) -> list[str]:
        """Files that earlier sdq versions wrote in place of `common_keys`, deleted on every
        run: a reader would find the old file beside the new one."""
        return []

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
        return [f"{self.folder}{prefix}-{n:06d}.tar"]

    def write(self, dest: Storage, prefix: str, n: int, entries: Iterable[Entry]) -> None:
        def fill(path: Path) -> None:
            with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
                for item, png, record in entries:
                    key = item_key(item.id)
                    for suffix, data in (("png", png), ("txt", item.prompt.encode()),
                                         ("json", _json(typed_record(record)).encode())):
                        info = tarfile.TarInfo(f"{key}.{suffix}")
                        info.size, info.mode = len(data), 0o644
                        info.mtime = int(item.finished_at.timestamp()) if item.finished_at else 0
                        tar.addfile(info, io.BytesIO(data))
        _upload(dest, self.keys(prefix, n, [])[0], fill, "application/x-tar")

    def common_keys(self) -> list[str]:
        return [HF_YAML]  # at the top in either layout: where `load_dataset(folder)` looks

    def finish(self, session: Session, dest: Storage, shards: list[list[int]],
               describe: Describe) -> None:
        """The features for `datasets`, which has no other way to learn a webdataset's types."""
        text = ("# The type of each field of this sdq export, for load_dataset(folder).\n"
                f"{json.dumps(declared_features(webdataset_features()), indent=1)}\n")
        dest.put(HF_YAML, text.encode(), content_type="application/yaml")


RECORD_TYPES: dict[str, str] = {
    "id": "int64", "job": "int64", "row": "int64", "status": "string", "prompt": "string",
    "negative_prompt": "string", "seed": "int64", "sampler": "string", "steps": "int64",
    "cfg": "float64", "eta": "float64", "width": "int64", "height": "int64",
    "prompt_syntax": "string", "clip_skip": "int64", "model": "string",
    "model_sha256": "string", "tags": "list[string]", "attempts": "int64", "error": "string",
    "batch": "string", "batch_position": "int64", "image_key": "string",
    "image_sha256": "string", "watermark": "string", "worker": "string", "device": "string",
    "created": "timestamp[us, tz=UTC]", "started": "timestamp[us, tz=UTC]",
    "finished": "timestamp[us, tz=UTC]", "duration_s": "float64", "template": "string",
    "template_values": "string", "cache_key": "string", "reused_from": "int64",
    "safety_flagged": "bool",
    "safety_action": "string", "safety_checker_sha256": "string",
    "safety_concept_scores": "list[float64]", "safety_special_scores": "list[float64]",
    "loras": "list[struct]", "embeddings": "list[struct]",
    "init_sha256": "string", "init_source": "string", "strength": "float64",
}
"""The fixed type of each field of `sdq.cli.common.item_record`, named as Hugging Face
`datasets` names dtypes: one table for the parquet schema and the dataset card's features."""
STRUCTS: dict[str, tuple[tuple[str, str], ...]] = {
    "loras": (("name", "string"), ("weight", "float64"), ("sha256", "string"), ("a1111", "string")),
    "embeddings": (("name", "string"), ("sha256", "string")),
}
"""The fields of each entry of a `list[struct]` field, with their types."""


def typed_record(record: Mapping[str, Any]) -> dict[str, Any]:
    """The record as every export format holds it, each value of its field's type in
    `RECORD_TYPES`: enums as their values, `template_values` as JSON text (`datasets` has no
    map type, and a struct of each template's own names would type every export its own way).
    Raises ValueError for a field the table lacks: a field added to the record must get its
    type, or one export would carry it untyped."""
    unknown = set(record) - set(RECORD_TYPES)
    if unknown:
        raise ValueError(f"record field(s) without a declared type: {', '.join(sorted(unknown))}")
    values = {name: value.value if isinstance(value, Enum) else value
              for name, value in record.items()}
    if values.get("template_values") is not None:
        values["template_values"] = _json(values["template_values"])
    return values


def _arrow_record() -> list[tuple[str, Any]]:
    """The record's fields as Arrow columns, with their declared types."""
    import pyarrow as pa

    arrow = {"string": pa.string(), "int64": pa.int64(), "float64": pa.float64(),
             "bool": pa.bool_(), "list[string]": pa.list_(pa.string()),
             "list[float64]": pa.list_(pa.float64()),
             "timestamp[us, tz=UTC]": pa.timestamp("us", tz="UTC")}
    for name, entry in STRUCTS.items():
        arrow[name] = pa.list_(pa.struct([(field, arrow[dtype]) for field, dtype in entry]))
    return [(name, arrow[name if dtype == "list[struct]" else dtype])
            for name, dtype in RECORD_TYPES.items()]


def parquet_schema() -> Any:
    """The one Arrow schema of every parquet shard: the record's fields with fixed types (a
    column that is null throughout a shard keeps its type), around `key`, `image` and
    `provenance`. The schema metadata carries the Hugging Face `datasets` features of `image`
    (the `huggingface` key, as `datasets` itself writes it), so that it loads as an image
    rather than a dict; `datasets` reads every other column's type from Arrow."""
    import pyarrow as pa

    columns = [("key", pa.string()), ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
               *_arrow_record(), ("provenance", pa.string())]
    features = {"info": {"features": {"image": {"_type": "Image"}}}}
    return pa.schema(columns, metadata={"huggingface": json.dumps(features)})


def metadata_schema() -> Any:
    """The Arrow schema of an imagefolder's `metadata.parquet`: `file_name` (which `datasets`
    turns into the `image` column) and the record's fields, typed as in `parquet_schema`."""
    import pyarrow as pa

    return pa.schema([("file_name", pa.string()), *_arrow_record()])


def card_features(fmt: str) -> list[dict[str, Any]] | None:
    """The features a dataset card of `fmt` declares: a webdataset's, or None where the files
    carry their own types (parquet; imagefolder's `metadata.parquet`)."""
    return webdataset_features() if fmt == "webdataset" else None


def webdataset_features() -> list[dict[str, Any]]:
    """A webdataset export's `dataset_info.features`, as the hub's YAML writes them.
    `datasets` infers a webdataset's types from its first five samples, so a field null or
    empty throughout them (no tags, no error) would load as `null` or `List(null)`, or fail
    on a later sample that has one; declared features make the whole export load typed."""
    def feature(name: str, dtype: str) -> dict[str, Any]:
        if dtype == "list[struct]":
            return {"name": name, "list": [feature(n, t) for n, t in STRUCTS[name]]}
        if dtype.startswith("list["):
            return {"name": name, "list": dtype.removeprefix("list[").removesuffix("]")}
        return {"name": name, "dtype": dtype}

    record = [feature(n, t) for n, t in RECORD_TYPES.items()]
    return [feature("__key__", "string"), feature("__url__", "string"),
            {"name": "png", "dtype": "image"}, feature("txt", "string"),
            {"name": "json", "struct": record}]


class _Parquet(_Writer):
    def __init__(self, folder: str) -> None:
        super().__init__(folder)
        check_format("parquet")
        self.schema = parquet_schema()

    def keys(self, prefix: str, n: int, ids: Sequence[int]) -> list[str]:
        return [f"{self.folder}{prefix}-{n:06d}.parquet"]

    def write(self, dest: Storage, prefix: str, n: int, entries: Iterable[Entry]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        rows = [self._row(item, png, record) for item, png, record in entries]
        table = pa.Table.from_pylist(rows, schema=self.schema)
        _upload(dest, self.keys(prefix, n, [])[0], lambda path: pq.write_table(table, path),
                "application/vnd.apache.parquet")

    def _row(self, item: Item, png: bytes, record: Mapping[str, Any]) -> dict[str, Any]:
        key = item_key(item.id)
        return {**typed_record(record), "key": key,
                "image": {"bytes": png, "path": f"{key}.png"}, "provenance": _json(record)}


class _ImageFolder(_Writer):
    def __init__(self, folder: str) -> None:
        super().__init__(folder)
        check_format("imagefolder")

    def keys(self, prefix: str, n: int, ids: Sequence[int]) -> list[str]:
        return [f"{self.folder}images/{item_key(i)}.png" for i in ids]

    def write(self, dest: Storage, prefix: str, n: int, entries: Iterable[Entry]) -> None:
        for item, png, _ in entries:
            dest.put(f"{self.folder}images/{item_key(item.id)}.png", png)

    def common_keys(self) -> list[str]:
        return [f"{self.folder}metadata.parquet"]

    def replaced_keys(self) -> list[str]:
        return [f"{self.folder}metadata.jsonl"]  # `datasets` refuses two metadata formats

    def finish(self, session: Session, dest: Storage, shards: list[list[int]],
               describe: Describe) -> None:
        """`metadata.parquet` for every image, rewritten whole from the records."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        rows = [{"file_name": f"images/{item_key(item.id)}.png", **typed_record(described)}
                for shard in shards for item, described in _read(session, shard, describe)]
        table = pa.Table.from_pylist(rows, schema=metadata_schema())
        _upload(dest, self.common_keys()[0], lambda path: pq.write_table(table, path),
                "application/vnd.apache.parquet")


_WRITERS: dict[str, Callable[[str], _Writer]] = {
    "webdataset": _WebDataset, "parquet": _Parquet, "imagefolder": _ImageFolder,
}
