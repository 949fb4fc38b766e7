"""Removing what a job left: its rows and its stored images.

Rows first, then images. The rows go in one transaction that locks the job's items (in id
order, as every writer of items does, then the job row) and re-checks under that lock that
none is running: a worker claiming at the same moment either got there first (the purge is
refused and nothing is deleted) or finds no rows to claim. Only then are the images deleted,
the recorded ones and anything else under the job's key prefix, so a worker never ends up
with done rows whose images are gone. A worker whose upload was in flight finds no row at its
record step and deletes its own object. If storage fails after the rows are gone, the error
names the objects left; they belong to no row, and since ids are never reused (migration
0005) no later job can point at them.

With the result cache, items of several jobs may point at one object (the job that made it
and those that reused it): a purge deletes only the objects no item of another job points at
(read under the same lock), so the last job to go takes the object with it. A reuse in flight
takes its reference in the transaction that writes its row, re-checking under lock that the row
it copies is still there (`transitions.record_reused`): committed before this purge, it is among
the rows read here and its object is kept; after, it finds its source gone and generates.

Init images (img2img) are shared by content across jobs the same way: a purge deletes an init
image's row and its object (`storage.init_key`) only when no item of another job points at it.
It locks those `init_images` rows (sorted by sha256, as `jobs.inits.record` locks them) before
reading which other items point at them, and deletes the objects while still holding the locks,
before its commit. A submit that locked the row first has committed its items by the time the
purge reads, so the image is kept; one that comes after waits for the purge, finds the row gone,
inserts it and stores the object again. If deleting an init object fails, the rows still go
(an object without a row is harmless: the next submit of the same bytes finds it there) and the
error names what is left.
"""
from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import delete, func, or_, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from sdq.core.errors import Refused
from sdq.db import transitions
from sdq.db.base import utcnow
from sdq.db.models import InitImageFile, Item, Status
from sdq.db.queries import get_job
from sdq.images.storage import Storage, StorageError, init_key


class JobBusy(Refused):
    """Items of the job are running under a live lease; purging would race their worker."""


@dataclass(frozen=True)
class JobContents:
    """What a purge of the job would delete."""

    job_id: int
    name: str | None
    items: int
    images: int


@dataclass(frozen=True)
class Purged:
    job_id: int
    items: int
    images: int
    """Objects deleted from storage (recorded images and any unrecorded leftovers)."""
    kept: int = 0
    """The job's images left in storage because items of other jobs point at them."""
    inits: int = 0
    """Init images deleted (row and object): those no item of another job starts from."""


def job_contents(session: Session, job_id: int) -> JobContents:
    """The job's size, for the confirmation; NotFound when there is no such job."""
    job = get_job(session, job_id)
    items, images = session.execute(
        select(func.count(), func.count(Item.image_key)).where(Item.job_id == job_id)).one()
    return JobContents(job_id, job.name or job.source_name, items, images)


def purge_job(engine: Engine, storage: Storage, job_id: int) -> Purged:
    """Delete the job's items and the job row, then its images. Raises NotFound (no such
    job), JobBusy (nothing deleted then), or the storage's StorageError naming what is left."""
    with Session(engine) as session, session.begin():
        job_contents(session, job_id)
        transitions.lock_job(session, job_id)
        _refuse_if_running(session, job_id)
        keys = {key for key in session.scalars(select(Item.image_key).where(
            Item.job_id == job_id, Item.image_key.is_not(None))) if key is not None}
        shared = _in_use_elsewhere(session, job_id)
        inits = _unshared_inits(session, job_id)
        items = transitions.delete_job(session, job_id)
        init_error = _delete_inits(session, storage, inits)
    # The job's own images go even when an init image's did not: its rows are deleted, so a
    # second purge could not find them.
    error = init_error
    try:
        deleted = _delete_objects(storage, (keys | set(storage.list(_prefix(job_id)))) - shared)
    except StorageError as exc:
        deleted, error = set(), exc
    if error is not None:
        raise StorageError(f"job {job_id}'s rows are deleted, but not all of its images "
                           f"(under {_prefix(job_id)} and {len(inits)} init image(s)): {error}"
                           ) from error
    return Purged(job_id, items, len(deleted), len(shared), len(inits))


def _unshared_inits(session: Session, job_id: int) -> list[str]:
    """The init images of the job's items that no item of another job starts from, their
    rows locked (in sha256 order) before the other items are counted."""
    used = select(Item.init_sha256).where(Item.job_id == job_id, Item.init_sha256.is_not(None))
    locked = session.scalars(select(InitImageFile.sha256).where(InitImageFile.sha256.in_(used))
                             .order_by(InitImageFile.sha256).with_for_update()).all()
    if not locked:
        return []
    elsewhere = set(session.scalars(select(Item.init_sha256).distinct().where(
        Item.init_sha256.in_(used), Item.job_id != job_id)))
    return [sha256 for sha256 in locked if sha256 not in elsewhere]


def _delete_inits(session: Session, storage: Storage, inits: list[str]) -> StorageError | None:
    """Delete the rows, then the objects (locks held, before the commit); a storage failure
    is returned, for after the commit, so that the rows go all the same."""
    for start in range(0, len(inits), _CHUNK):
        session.execute(delete(InitImageFile).where(
            InitImageFile.sha256.in_(inits[start:start + _CHUNK])))
    try:
        _delete_objects(storage, {init_key(sha256) for sha256 in inits})
    except StorageError as exc:
        return exc
    return None


def _in_use_elsewhere(session: Session, job_id: int) -> set[str]:
    """The objects of the job's items that items of other jobs point at too: those reusing
    an image made here, and the makers and other reusers of the images reused here."""
    here = select(Item.id).where(Item.job_id == job_id)
    makers = select(Item.reused_from).where(Item.job_id == job_id, Item.reused_from.is_not(None))
    return set(session.scalars(select(Item.image_key).distinct().where(
        Item.job_id != job_id, Item.image_key.is_not(None),
        or_(Item.reused_from.in_(here), Item.id.in_(makers), Item.reused_from.in_(makers)))))


_CHUNK = 500
"""Keys per `IN (...)`: well under SQLite's bound-parameter limit."""


def _prefix(job_id: int) -> str:
    return f"{job_id}/"  # the folder of `storage.image_key(job_id, ...)`


def _refuse_if_running(session: Session, job_id: int) -> None:
    running = session.scalar(select(func.count()).where(
        Item.job_id == job_id, Item.status == Status.RUNNING, Item.lease_expires_at > utcnow()))
    if running:
        raise JobBusy(f"job {job_id} has {running} item(s) running; cancel it (`sdq cancel "
                      f"{job_id}`) and purge once they finish")


def _delete_objects(storage: Storage, keys: set[str]) -> set[str]:
    for key in sorted(keys):
        storage.delete(key)
    return keys
