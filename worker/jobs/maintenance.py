"""Removing what a job left: its rows and its stored images.

Order matters for failures and for workers still busy with the job: images go first, so a
purge that storage interrupts leaves the rows and can simply be run again; then the rows, in
one transaction that re-checks that no item is running; last, a second sweep of the job's key
prefix removes an image a worker may have stored in between (once the rows are gone, a
runner's record step finds nothing to record and stores nothing more).

With the result cache, items of several jobs may point at one object (the job that made it
and those that reused it): a purge deletes only the objects no item of another job points at,
so the last job to go takes the object with it.
"""
from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import delete, func, or_, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from sdq.db.base import utcnow
from sdq.db.models import Item, Job, Status
from sdq.sdmodel.errors import NotFound, Refused
from sdq.worker.images.storage import Storage


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


def job_contents(session: Session, job_id: int) -> JobContents:
    """The job's size, for the confirmation; NotFound when there is no such job."""
    job = session.get(Job, job_id)
    if job is None:
        raise NotFound(f"no job {job_id}")
    items, images = session.execute(
        select(func.count(), func.count(Item.image_key)).where(Item.job_id == job_id)).one()
    return JobContents(job_id, job.name or job.source_name, items, images)


def purge_job(engine: Engine, storage: Storage, job_id: int) -> Purged:
    """Delete the job's images, then its items and the job row. Raises NotFound (no such
    job), JobBusy, or the storage's StorageError (nothing deleted from the database then)."""
    with Session(engine) as session:
        job_contents(session, job_id)
        _refuse_if_running(session, job_id)
        keys = set(session.scalars(select(Item.image_key).where(
            Item.job_id == job_id, Item.image_key.is_not(None))))
        shared = _in_use_elsewhere(session, job_id)
    deleted = _delete_objects(storage, (keys | set(storage.list(_prefix(job_id)))) - shared)
    with Session(engine) as session, session.begin():
        session.execute(select(Item.id).where(Item.job_id == job_id).with_for_update())
        _refuse_if_running(session, job_id)
        shared = _in_use_elsewhere(session, job_id)
        items = session.execute(delete(Item).where(Item.job_id == job_id)).rowcount
        session.execute(delete(Job).where(Job.id == job_id))
    deleted |= _delete_objects(storage, set(storage.list(_prefix(job_id))) - shared)
    return Purged(job_id, items, len(deleted), len(shared))


def _in_use_elsewhere(session: Session, job_id: int) -> set[str]:
    """The objects of the job's items that items of other jobs point at too: those reusing
    an image made here, and the makers and other reusers of the images reused here."""
    here = select(Item.id).where(Item.job_id == job_id)
    makers = select(Item.reused_from).where(Item.job_id == job_id, Item.reused_from.is_not(None))
    return set(session.scalars(select(Item.image_key).distinct().where(
        Item.job_id != job_id, Item.image_key.is_not(None),
        or_(Item.reused_from.in_(here), Item.id.in_(makers), Item.reused_from.in_(makers)))))


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
