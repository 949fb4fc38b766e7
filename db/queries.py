"""The questions users and workers ask of the index, and the bulk submit that fills it.

Every function takes the caller's Session and leaves the transaction to the caller: a submit
is committed (or rolled back) whole by whoever opened it.

Over 400 lines on purpose: it is the index's list of questions, each a short function over
the same models and dialect helpers; split by caller, the same question would be asked twice.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from itertools import islice
from typing import Any

from sqlalchemy import ColumnElement, Select, Text, cast, exists, func, insert, or_, select
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from sdq.core.errors import InvalidInput, NotFound, Refused
from sdq.core.params import DEFAULTS
from sdq.core.states import OPEN

from .base import utcnow
from .fulltext import match_prompt, parse_query
from .models import Item, Job, Model, Status

REQUIRED_ITEM_FIELDS = frozenset({"prompt", "seed", "sampler", "steps", "cfg", "width", "height"})
OPTIONAL_ITEM_FIELDS = {"negative_prompt": "", "eta": 0.0, "model_id": None, "tags": None,
                        "template": None, "template_values": None,
                        "prompt_syntax": DEFAULTS["prompt_syntax"],
                        "clip_skip": DEFAULTS["clip_skip"], "loras": None, "embeddings": None,
                        "init_sha256": None, "init_source": None, "strength": None}
"""What a submitted item may carry, besides `row_index` (default: its position in the
submission); every other column is the queue's to fill in."""

# COPY's binary format needs each column's exact type; a mismatch fails loudly, never silently.
_COPY_TYPES = {
    "job_id": "int4", "row_index": "int4", "prompt": "text", "negative_prompt": "text",
    "seed": "int8", "sampler": "varchar", "steps": "int4", "cfg": "float8", "eta": "float8",
    "width": "int4", "height": "int4", "model_id": "int4", "tags": "json", "template": "text",
    "template_values": "json", "prompt_syntax": "varchar", "clip_skip": "int4", "loras": "json",
    "embeddings": "json", "init_sha256": "varchar", "init_source": "text", "strength": "float8",
    "status": "varchar", "attempts": "int4", "created_at": "timestamptz",
}
_CHUNK = 10_000
PHRASE_WINDOW = 20_000
"""Ids searched newest-first by a PostgreSQL phrase query before it turns to the GIN index."""


@dataclass(frozen=True)
class Page:
    """One page of results, newest first; pass `next_before` back as `before` for the next."""

    items: list[Item]
    next_before: int | None


def search_items(
    session: Session,
    *,
    text: str | None = None,
    seed: int | None = None,
    model: str | None = None,
    job_id: int | None = None,
    status: Status | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    tag: str | None = None,
    flagged: bool | None = None,
    values: Mapping[str, str] | None = None,
    lora: str | None = None,
    init: str | None = None,
    before: int | None = None,
    limit: int | None = 50,
) -> Page:
    """Items matching every given filter, newest (highest id) first, `limit` at a time (None:
    all of them, in one page).

    `text` is a prompt search (words and "quoted phrases", all required; see `fulltext`);
    `model` is a model name or a prefix of its sha256; `since` (inclusive) and `until`
    (exclusive) bound the creation time; `tag` matches the item's own tags or its job's (a
    scan: tags are not indexed). `flagged` True or False keeps the items the safety checker
    flagged, or checked and passed; items never checked match neither. `values` are template
    choices the item was expanded with, label to value (compared as text, so a grid's `cfg`
    is "7.5"; a scan too). `lora` keeps the items made with the LoRA of that name, at any
    weight (a scan). `init` keeps img2img items by their init image: `item:ID`, those started
    from item ID's stored image (whatever name it came under: images are compared by
    sha256), or a prefix of the init image's sha256. Paging is by keyset (`before` an id), so a page costs the
    same however deep it is and rows added meanwhile do not shift it.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    stmt: Select[Any] = select(Item)
    key: ColumnElement[int] = Item.id.expression
    query = parse_query(text or "")
    if text and text.strip() and not query:
        raise InvalidInput(f"nothing to search for in {text!r}: give a word, or a phrase in "
                           "quotes")
    dialect = session.get_bind().dialect.name
    if query:
        stmt, key = match_prompt(stmt, dialect, query)
    if seed is not None:
        stmt = stmt.where(Item.seed == seed)
    if model:
        named = or_(Model.name == model, Model.sha256.startswith(model.lower(), autoescape=True))
        stmt = stmt.where(Item.model_id.in_(select(Model.id).where(named)))
    if job_id is not None:
        stmt = stmt.where(Item.job_id == job_id)
    if status is not None:
        stmt = stmt.where(Item.status == status)
    if since is not None:
        stmt = stmt.where(Item.created_at >= since)
    if until is not None:
        stmt = stmt.where(Item.created_at < until)
    if tag is not None:
        tagged_jobs = select(Job.id).where(_has_tag(Job.tags, tag, dialect))
        stmt = stmt.where(or_(_has_tag(Item.tags, tag, dialect), Item.job_id.in_(tagged_jobs)))
    if flagged is not None:
        stmt = stmt.where(Item.safety_flagged.is_(flagged))
    for label, value in (values or {}).items():
        stmt = stmt.where(_template_value(label, dialect) == value)
    if lora is not None:
        stmt = stmt.where(_has_lora(lora, dialect))
    if init is not None:
        stmt = stmt.where(_started_from(init))
    if before is not None:
        stmt = stmt.where(key < before)
    if limit is None:
        return Page(list(session.scalars(stmt.order_by(key.desc()))), None)
    if dialect == "postgresql" and query.has_multiword_phrase:
        rows = _newest_in_two_steps(session, stmt, limit + 1, before)
    else:
        rows = list(session.scalars(stmt.order_by(key.desc()).limit(limit + 1)))
    return Page(rows[:limit], rows[limit - 1].id if len(rows) > limit else None)


def _started_from(init: str) -> ColumnElement[bool]:
    """`search_items`' `init` filter; InvalidInput for what is neither form."""
    if (number := init.removeprefix("item:")) != init:
        if not number.isdigit():
            raise InvalidInput(f"--init {init!r}: expected item:ID or a sha256 prefix")
        return Item.init_sha256.in_(select(Item.image_sha256).where(Item.id == int(number))
                                    .scalar_subquery())
    if not re.fullmatch(r"[0-9a-fA-F]{4,64}", init):
        raise InvalidInput(f"--init {init!r}: expected item:ID or a sha256 prefix of 4 to 64 "
                           "hex digits")
    return Item.init_sha256.startswith(init.lower())


def _has_tag(column: Any, tag: str, dialect: str) -> ColumnElement[bool]:
    """Whether a JSON list-of-strings column holds `tag`: the JSON functions differ by engine."""
    if dialect == "postgresql":
        return cast(column, JSONB).has_key(tag)
    each = func.json_each(column).table_valued("value")
    return exists(select(each.c.value).where(each.c.value == tag))


def _has_lora(name: str, dialect: str) -> ColumnElement[bool]:
    """Whether the item's LoRA records ([{name, weight, sha256}], or null) name `name`."""
    if dialect == "postgresql":
        return cast(Item.loras, JSONB).contains([{"name": name}])
    each = func.json_each(Item.loras).table_valued("value")
    return exists(select(each.c.value).where(func.json_extract(each.c.value, "$.name") == name))


def _template_value(label: str, dialect: str) -> ColumnElement[Any]:
    """The text of one template choice of an item (null when it has none by that label)."""
    if dialect == "postgresql":
        return cast(Item.template_values, JSONB)[label].astext
    path = '$."' + label.replace('"', '""') + '"'
    return cast(func.json_extract(Item.template_values, path), Text)


def _newest_in_two_steps(
    session: Session, stmt: Select[Any], count: int, before: int | None
) -> list[Item]:
    """The newest `count` items of `stmt` on PostgreSQL, when it searches for a phrase.

    PostgreSQL estimates a phrase to be as frequent as its words together. For words that are
    common but seldom adjacent it then walks the primary key backwards, expecting a match every
    few rows, and may read the whole table for a page (a second, at a million rows). So the
    newest `PHRASE_WINDOW` ids are searched that way, a bounded cost that suffices for common
    phrases; if they hold too few matches, the rest is searched through the GIN index, with the
    ordering hidden from the planner (`id + 0`) so that it cannot take the backward walk again.
    """
    top = before if before is not None else session.scalar(select(func.max(Item.id)))
    if top is None:
        return []
    floor = top - PHRASE_WINDOW
    newest = stmt.where(Item.id > floor).order_by(Item.id.desc()).limit(count)
    rows = list(session.scalars(newest))
    if len(rows) < count:
        rest = stmt.where(Item.id <= floor).order_by((Item.id + 0).desc()).limit(count - len(rows))
        rows += session.scalars(rest)
    return rows


def status_counts(session: Session, job_id: int) -> dict[Status, int]:
    """How many of the job's items are in each status (every status present, zeros too)."""
    counts = dict.fromkeys(Status, 0)
    stmt = select(Item.status, func.count()).where(Item.job_id == job_id).group_by(Item.status)
    counts.update({status: n for status, n in session.execute(stmt)})
    return counts


STALLED_S = 120.0
"""No image for this long (or 20 images' worth at the job's rate) means stalled, not slow."""


@dataclass(frozen=True)
class Progress:
    """How far a job is: counts per status, and the throughput of its finished images."""

    counts: dict[Status, int]
    started_at: datetime | None
    last_finished_at: datetime | None
    now: datetime | None = None
    """When it was read: a job whose last image finished long before is stalled, not late."""
    reused: int = 0
    """Done items that reuse an image stored before (no model call): not in the rate."""

    @property
    def remaining(self) -> int:
        return sum(self.counts[s] for s in OPEN)

    @property
    def images_per_s(self) -> float | None:
        """Generated images over the time from the first start to the last finish of those;
        None before two points in time exist to divide by."""
        if self.started_at is None or self.last_finished_at is None:
            return None
        elapsed = (self.last_finished_at - self.started_at).total_seconds()
        return (self.counts[Status.DONE] - self.reused) / elapsed if elapsed > 0 else None

    @property
    def stalled_s(self) -> float | None:
        """Seconds since the last image finished, when that is far longer than the rate so far
        explains (20 images' worth, at least STALLED_S) and items remain: nothing is moving
        (workers gone, a service down), so no time left can honestly be given."""
        rate = self.images_per_s
        if not self.remaining or not rate or self.now is None or self.last_finished_at is None:
            return None
        idle = (self.now - self.last_finished_at).total_seconds()
        return idle if idle > max(STALLED_S, 20 / rate) else None

    @property
    def eta_s(self) -> float | None:
        """Seconds until the rest is done at the rate so far (0 when nothing remains); None
        before any rate is known or while the job is stalled."""
        if not self.remaining:
            return 0.0
        rate = self.images_per_s
        return self.remaining / rate if rate and self.stalled_s is None else None


def job_progress(session: Session, job_id: int, now: datetime | None = None) -> Progress:
    """The job's status counts, how many of its done items reused an image, and the time
    span of the ones generated, as of `now` (default: the current time)."""
    generated = Item.reused_from.is_(None)
    span = select(func.min(Item.started_at).filter(generated),
                  func.max(Item.finished_at).filter(generated),
                  func.count().filter(Item.reused_from.is_not(None))).where(
        Item.job_id == job_id, Item.status == Status.DONE)
    started, finished, reused = session.execute(span).one()
    return Progress(status_counts(session, job_id), started, finished, now or utcnow(), reused)


def failure_reasons(session: Session, job_id: int, limit: int = 10) -> list[tuple[str, int, int]]:
    """(error, how many items, the lowest such item id) for the job's failed items, most
    frequent first: a thousand items failing alike is one line, not a thousand."""
    error = func.coalesce(Item.last_error, "")
    stmt = (select(error, func.count(), func.min(Item.id))
            .where(Item.job_id == job_id, Item.status == Status.FAILED)
            .group_by(error).order_by(func.count().desc(), func.min(Item.id)).limit(limit))
    return [(reason, count, first) for reason, count, first in session.execute(stmt)]


def recent_jobs(session: Session, limit: int | None = 20) -> list[tuple[Job, dict[Status, int]]]:
    """The newest jobs (None: all) with their item counts per status, in two queries whatever
    the limit."""
    jobs = list(session.scalars(select(Job).order_by(Job.id.desc()).limit(limit)))
    counts = {job.id: dict.fromkeys(Status, 0) for job in jobs}
    stmt = (select(Item.job_id, Item.status, func.count()).where(Item.job_id.in_(counts))
            .group_by(Item.job_id, Item.status))
    for job_id, status, n in session.execute(stmt):
        counts[job_id][status] = n
    return [(job, counts[job.id]) for job in jobs]


def flagged_counts(session: Session, job_ids: Iterable[int]) -> dict[int, int]:
    """How many images of each job the safety checker flagged (zeros included)."""
    ids = list(job_ids)
    counts = dict.fromkeys(ids, 0)
    stmt = (select(Item.job_id, func.count()).where(Item.job_id.in_(ids), Item.safety_flagged.is_(True))
            .group_by(Item.job_id))
    counts.update({job_id: n for job_id, n in session.execute(stmt)})
    return counts


def unchecked_count(session: Session, job_id: int) -> int:
    """How many of the job's stored images carry no safety verdict: in a job that names a
    checker, images reused before the check entered the cache key (never "not flagged")."""
    return session.scalar(select(func.count()).where(
        Item.job_id == job_id, Item.image_key.is_not(None),
        Item.safety_checker_sha256.is_(None))) or 0


def get_job(session: Session, job_id: int) -> Job:
    """The job, or NotFound naming the id."""
    job = session.get(Job, job_id)
    if job is None:
        raise NotFound(f"no job {job_id}")
    return job


def get_item(session: Session, item_id: int) -> Item:
    """The item, or NotFound naming the id."""
    item = session.get(Item, item_id)
    if item is None:
        raise NotFound(f"no item {item_id}")
    return item


def get_items(session: Session, item_ids: Sequence[int]) -> list[Item]:
    """The items in the order asked (each once), or NotFound naming every missing id."""
    found = {item.id: item for item in session.scalars(select(Item).where(Item.id.in_(item_ids)))}
    if missing := [str(i) for i in item_ids if i not in found]:
        raise NotFound(f"no item {', '.join(missing)}")
    return [found[i] for i in dict.fromkeys(item_ids)]


def job_items(session: Session, job_id: int) -> Sequence[Item]:
    """Every item of the job in row order, or NotFound when there is no such job."""
    get_job(session, job_id)
    return session.scalars(select(Item).where(Item.job_id == job_id)
                           .order_by(Item.row_index)).all()


def find_model(session: Session, ref: str) -> Model | None:
    """The model a user means by `ref`: a name, else a prefix of its sha256 (at least 6 hex
    digits). Raises NotFound (a LookupError) when `ref` fits more than one."""
    found = list(session.scalars(select(Model).where(Model.name == ref).limit(2)))
    if not found and len(ref) >= 6:
        prefix = Model.sha256.startswith(ref.lower(), autoescape=True)
        found = list(session.scalars(select(Model).where(prefix).limit(2)))
    if len(found) > 1:
        raise NotFound(f"{ref!r} names more than one model; use more of its hash")
    return found[0] if found else None


def register_model(session: Session, *, sha256: str, name: str, source_uri: str,
                   architecture: str = "sd-v1") -> Model:
    """Give the model with this hash the name `name`, adding its row if it is new.

    Names are for people to type, so one name never means two models; a model already known
    under another name (e.g. added by a submit) is renamed.
    """
    taken = session.scalar(select(Model).where(Model.name == name, Model.sha256 != sha256))
    if taken is not None:
        raise Refused(f"the name {name!r} is taken by model {taken.short_hash}")
    model = session.scalar(select(Model).where(Model.sha256 == sha256))
    if model is None:
        model = Model(sha256=sha256, name=name, source_uri=source_uri, architecture=architecture)
        session.add(model)
    else:
        model.name, model.source_uri = name, source_uri
    session.flush()
    return model


def all_models(session: Session) -> Sequence[Model]:
    """Every known model, by name."""
    return session.scalars(select(Model).order_by(Model.name)).all()


def seconds_per_step(session: Session, *, model_id: int, sampler: str, width: int,
                     height: int) -> float | None:
    """Mean seconds per image and step of the finished images of one model, sampler and
    size (None without any): what a plan's estimate is made from."""
    return session.scalar(select(func.avg(Item.duration_s / Item.steps)).where(
        Item.model_id == model_id, Item.status == Status.DONE, Item.duration_s.is_not(None),
        Item.sampler == sampler, Item.width == width, Item.height == height))


def model_item_counts(session: Session) -> dict[int, int]:
    """How many items each model made (or is to make), by model id."""
    stmt = select(Item.model_id, func.count()).where(Item.model_id.is_not(None)) \
        .group_by(Item.model_id)
    return {model_id: n for model_id, n in session.execute(stmt) if model_id is not None}


def remove_model(session: Session, ref: str) -> Model:
    """Delete a model from the registry; refused while items point at it, since their
    provenance would lose its hash."""
    model = find_model(session, ref)
    if model is None:
        raise NotFound(f"no model named {ref!r}")
    used = session.scalar(select(func.count()).where(Item.model_id == model.id))
    if used:
        raise Refused(f"model {model.name!r} ({model.short_hash}) is recorded with {used} "
                      "item(s) and stays")
    session.delete(model)
    session.flush()
    return model


def batch_items(session: Session, batch_id: str) -> Sequence[Item]:
    """The items of one batch, in their batch positions (the order the worker runs them)."""
    stmt = select(Item).where(Item.batch_id == batch_id).order_by(Item.batch_position)
    return session.scalars(stmt).all()


def submit_job(session: Session, job: Job, items: Iterable[Mapping[str, Any]]) -> Job:
    """Add `job` and its items (each a mapping of Item fields) in the session's transaction.

    Items stream to the database without the ORM: binary COPY on PostgreSQL; on SQLite
    multi-row INSERTs (SQLAlchemy's "insertmanyvalues", which RETURNING switches on), because
    one INSERT per row would make FTS5 flush its index once per row through the sync trigger,
    four times slower. Nothing is committed here: if any item is refused, the caller's rollback
    leaves no job and no item behind.
    """
    session.add(job)
    session.flush()
    rows = _item_rows(job, items)
    connection = session.connection()
    if connection.dialect.name == "postgresql":
        job.item_count = _copy_items(connection.connection.driver_connection, rows)
    else:
        job.item_count = 0
        statement = insert(Item).returning(Item.id)
        while chunk := list(islice(rows, _CHUNK)):
            connection.execute(statement, chunk)
            job.item_count += len(chunk)
    session.flush()
    return job


def _item_rows(job: Job, items: Iterable[Mapping[str, Any]]) -> Iterator[dict[str, Any]]:
    """The column values of each new item; unknown or missing fields are refused by name."""
    allowed = REQUIRED_ITEM_FIELDS | OPTIONAL_ITEM_FIELDS.keys() | {"row_index"}
    fixed = {"job_id": job.id, "status": Status.PENDING, "attempts": 0,
             "created_at": job.created_at}
    for position, spec in enumerate(items):
        if not (spec.keys() <= allowed and REQUIRED_ITEM_FIELDS <= spec.keys()):
            unknown = sorted(spec.keys() - allowed)
            missing = sorted(REQUIRED_ITEM_FIELDS - spec.keys())
            problems = [f"unknown field(s) {unknown}"] if unknown else []
            problems += [f"missing field(s) {missing}"] if missing else []
            raise ValueError(f"item {position}: {'; '.join(problems)}")
        yield {**OPTIONAL_ITEM_FIELDS, "row_index": position, **spec, **fixed}


def _copy_items(connection: Any, rows: Iterator[dict[str, Any]]) -> int:
    """COPY rows into items through the session's own psycopg connection (and transaction).

    psycopg's errors are wrapped as SQLAlchemy's, so callers catch `IntegrityError` & co.
    whichever database they run on.
    """
    import psycopg

    count = 0
    names = list(_COPY_TYPES)
    statement = f"COPY items ({', '.join(names)}) FROM STDIN (FORMAT BINARY)"
    try:
        with connection.cursor() as cursor, cursor.copy(statement) as copy:
            copy.set_types(list(_COPY_TYPES.values()))
            for row in rows:
                copy.write_row([row[name] for name in names])
                count += 1
    except psycopg.Error as exc:
        raise DBAPIError.instance(statement, None, exc, psycopg.Error) from exc
    return count
