"""The changes of state of jobs and items, as the functions every writer calls.

Each runs its statements in the caller's session and leaves the transaction to the caller, and
checks the change against the tables of `sdq.core.states` (a change they do not allow raises
TransitionRefused). Writers lock in one order: a job's items in id order, then the job row;
an UPDATE alone would lock items in the table's physical order, which a writer locking by id
can cross.
"""
from __future__ import annotations

from datetime import date, datetime
from typing import Any, cast

from sqlalchemy import CursorResult, Result, delete, or_, select, update
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement

from sdq.core.states import ENDED, ITEMS, JOBS, WAITING, Status

from .base import utcnow
from .models import Item, Job, Schedule


def _rowcount(result: Result[Any]) -> int:
    """Rows an UPDATE or DELETE matched (the session returns its cursor's result for them)."""
    return cast(CursorResult[Any], result).rowcount


# -- jobs --


def start_job(job: Job, *, embedded: bool) -> None:
    """A job submitted, retried or resumed runs: here (embedded: running), else queued for
    the workers."""
    job.status = JOBS.check(job.status or Status.PENDING,
                            Status.RUNNING if embedded else Status.QUEUED)


def resume_job(job: Job, *, embedded: bool) -> None:
    """A job whose open items are taken up again runs again, unless it ended (done, failed)."""
    if job.status not in ENDED:
        start_job(job, embedded=embedded)


def hand_back_job(session: Session, job_id: int) -> None:
    """An interrupted in-process run's job, if still running, back to pending: `sdq status`
    must not show it running when nothing runs it (`sdq resume` takes it up)."""
    session.execute(update(Job).where(
        Job.id == job_id, Job.status.in_(JOBS.sources([Status.RUNNING], Status.PENDING)))
        .values(status=Status.PENDING))


def mark_queued(session: Session, where: ColumnElement[bool]) -> None:
    """The pending items matching `where`, whose messages are now published: queued, stamped
    with the time (what the sweep's grace period counts from)."""
    session.execute(update(Item).where(
        where, Item.status.in_(ITEMS.sources([Status.PENDING], Status.QUEUED)))
        .values(status=Status.QUEUED, queued_at=utcnow())
        .execution_options(synchronize_session=False))


def requeue_expired(session: Session, now: datetime, job_id: int | None = None) -> None:
    """Running items (of one job, or all) whose lease expired before `now` back to queued:
    the worker that held them is gone, so a later delivery may take them."""
    where = [Item.status.in_(ITEMS.sources([Status.RUNNING], Status.QUEUED)),
             Item.lease_expires_at < now]
    if job_id is not None:
        where.append(Item.job_id == job_id)
    session.execute(update(Item).where(*where).values(status=Status.QUEUED, lease_expires_at=None)
                    .execution_options(synchronize_session=False))


def retry_job(session: Session, job: Job) -> None:
    """The job's failed items pending again, each with a fresh set of attempts; the job queued
    until they are run."""
    session.execute(update(Item).where(
        Item.job_id == job.id, Item.status.in_(ITEMS.sources([Status.FAILED], Status.PENDING)))
        .values(status=Status.PENDING, attempts=0, last_error=None, finished_at=None))
    job.status, job.finished_at = JOBS.check(job.status, Status.QUEUED), None


def cancel_job(session: Session, job: Job) -> int:
    """Cancel the job's items that no worker has taken (running ones finish), and the job
    unless it ended; how many items were cancelled."""
    now = utcnow()
    waiting = [Item.job_id == job.id, Item.status.in_(ITEMS.sources(WAITING, Status.CANCELLED))]
    session.execute(select(Item.id).where(*waiting).order_by(Item.id).with_for_update())
    count = _rowcount(session.execute(update(Item).where(*waiting)
                                      .values(status=Status.CANCELLED, finished_at=now)))
    if job.status not in ENDED:
        job.status, job.finished_at = JOBS.check(job.status, Status.CANCELLED), now
    return count


def lock_job(session: Session, job_id: int) -> None:
    """Lock the job's items (in id order), then its row, for a change of the whole job."""
    session.execute(select(Item.id).where(Item.job_id == job_id).order_by(Item.id)
                    .with_for_update())
    session.execute(select(Job.id).where(Job.id == job_id).with_for_update())


def delete_job(session: Session, job_id: int) -> int:
    """Delete the job's items and its row (lock them first: `lock_job`); how many items."""
    items = _rowcount(session.execute(delete(Item).where(Item.job_id == job_id)))
    session.execute(delete(Job).where(Job.id == job_id))
    return items


# -- schedules --


def mark_schedule_ran(session: Session, schedule_id: int, day: date) -> None:
    """Record the day of a schedule's latest run (for display; the jobs' unique (schedule,
    day) pair is what keeps a day from running twice)."""
    session.execute(update(Schedule).where(
        Schedule.id == schedule_id,
        or_(Schedule.last_run_day.is_(None), Schedule.last_run_day < day),
    ).values(last_run_day=day))
