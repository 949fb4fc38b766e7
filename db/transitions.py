"""The changes of state of jobs and items, as the functions every writer calls.

Each runs its statements in the caller's session and leaves the transaction to the caller, and
checks the change against the tables of `sdq.core.states` (a change they do not allow raises
TransitionRefused). Writers lock in one order: a job's items in id order, then the job row;
an UPDATE alone would lock items in the table's physical order, which a writer locking by id
can cross. The caller owns the session and its short transaction; nothing here commits.
"""
from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any, cast

from sqlalchemy import CursorResult, Result, Row, delete, or_, select, update
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement

from sdq.core.states import ENDED, FINISHED, ITEMS, JOBS, OPEN, WAITING, Status

from .base import utcnow
from .models import Item, Job, Model, Schedule

_FINISHED = sorted(FINISHED)
_OPEN = sorted(OPEN)
ERROR_CHARS = 2000
"""The longest `last_error` kept: a whole traceback's worth of message, no more."""

# -- items ------------------------------------------------------------------------------------


def leased(status: Status, lease_expires_at: datetime | None, now: datetime) -> bool:
    """Running under a lease that has not run out: its holder may be alive."""
    return status == Status.RUNNING and lease_expires_at is not None and lease_expires_at > now


def lock_for_claim(session: Session, ids: Collection[int]) -> list[Row[Any]]:
    """The items `ids`, locked in id order, each with its model's sha256 and its job's safety
    checker and `on_flag`: what a claim decides on."""
    return list(session.execute(
        select(Item, Model.sha256, Job.safety_checker, Job.on_flag)
        .join(Model, Item.model_id == Model.id).join(Job, Item.job_id == Job.id)
        .where(Item.id.in_(ids)).order_by(Item.id).with_for_update(of=Item)))


def claim_item(item: Item, *, worker_host: str, batch_id: str, lease_s: float,
               cache_key: str | None, now: datetime) -> None:
    """Queued (or an expired lease) -> running under this claim: a lease, one more attempt
    (`cache_key` None: none known, its safety checker was not found)."""
    item.status, item.attempts = Status.RUNNING, item.attempts + 1
    item.lease_expires_at = now + timedelta(seconds=lease_s)
    item.worker_host, item.started_at, item.batch_id = worker_host, now, batch_id
    item.cache_key = cache_key


def fail_item(item: Item, reason: str, now: datetime) -> None:
    """-> failed at claim time: its attempts are used up, or its row does not hold valid
    parameters."""
    item.status, item.lease_expires_at, item.finished_at = Status.FAILED, None, now
    item.last_error = reason


def give_up_item(item: Item, now: datetime) -> None:
    """-> failed: claimed `max_attempts` times already, each ending without a result."""
    fail_item(item, f"gave up after {item.attempts} attempts; last error: "
                    f"{item.last_error or 'worker lost during the batch'}", now)


def renew_leases(session: Session, ids: Collection[int], *, worker_host: str,
                 lease_s: float) -> set[int]:
    """Push back the leases of the items `worker_host` still runs; the ids it still runs."""
    return set(session.scalars(
        update(Item).where(Item.id.in_(ids), Item.status == Status.RUNNING,
                           Item.worker_host == worker_host)
        .values(lease_expires_at=utcnow() + timedelta(seconds=lease_s))
        .returning(Item.id).execution_options(synchronize_session=False)))


SAFETY_COLUMNS = ("safety_flagged", "safety_scores", "safety_checker_sha256", "safety_action")
"""An item's safety verdict: all null when no check ran ("not checked")."""


@dataclass(frozen=True)
class Reuse:
    """A stored image an item takes over: the item that made it, the done item whose row it
    is copied from (the maker itself, or an earlier reuse of its image), and what that row
    records of the image and its safety verdict (`SAFETY_COLUMNS`)."""

    item_id: int
    copied_from: int
    image_key: str
    image_sha256: str | None
    watermark: str | None
    safety: Mapping[str, Any]


def record_reused(session: Session, reuses: Mapping[int, tuple[str, Reuse]], *,
                  worker_host: str, device: str) -> set[int]:
    """Items -> done as reusing a stored image (`reuses`: item id -> its cache key and the
    image), for those still free: not finished, not under a live lease. Their ids.

    The reuse takes its reference to the object in this transaction: the row it copies is
    locked with the items (in id order, as a purge locks a job's items) and must still be
    done with that image. A purge that committed first leaves the item to be generated; one
    that comes after finds this row, so it keeps the object (`maintenance.purge_job`)."""
    now = utcnow()
    sources = {reuse.copied_from for _, reuse in reuses.values()}
    rows = session.execute(select(Item.id, Item.job_id, Item.status, Item.lease_expires_at,
                                  Item.image_key)
                           .where(Item.id.in_(set(reuses) | sources)).order_by(Item.id)
                           .with_for_update()).all()
    held = {item_id: stored for item_id, _, status, _, stored in rows
            if item_id in sources and status == Status.DONE}
    free = [(item_id, job_id) for item_id, job_id, status, lease, _ in rows
            if item_id in reuses and status not in FINISHED and not leased(status, lease, now)
            and held.get(reuses[item_id][1].copied_from) == reuses[item_id][1].image_key]
    if free:
        session.execute(update(Item), [{
            "id": item_id, "status": Status.DONE, "cache_key": reuses[item_id][0],
            "reused_from": reuses[item_id][1].item_id,
            "image_key": reuses[item_id][1].image_key,
            "image_sha256": reuses[item_id][1].image_sha256,
            "watermark": reuses[item_id][1].watermark,
            **{column: reuses[item_id][1].safety.get(column) for column in SAFETY_COLUMNS},
            "device": device, "worker_host": worker_host, "started_at": now, "finished_at": now,
            "duration_s": 0.0, "lease_expires_at": None, "last_error": None,
        } for item_id, _ in free])
    finish_jobs(session, {job_id for _, job_id in free})
    return {item_id for item_id, _ in free}


@dataclass(frozen=True)
class Recorded:
    """What `record_done` found: the items it marked done, and the image key every row it
    found records (a claim that lost its item must not delete the object another claim
    recorded)."""

    ids: set[int]
    image_keys: dict[int, str | None]


def record_done(session: Session, rows: Sequence[Mapping[str, Any]],
                attempts: Mapping[int, int], job_ids: Iterable[int]) -> Recorded:
    """Running -> done, for the items this claim still holds: running, with the attempt it
    claimed (`attempts`: item id -> attempt). `rows` carry each item's `id` and the columns
    of its result (image, timings, safety); anything else is left as it is."""
    found = {row.id: row for row in session.execute(
        select(Item.id, Item.status, Item.attempts, Item.image_key)
        .where(Item.id.in_(list(attempts))).order_by(Item.id).with_for_update())}
    ours = {item_id for item_id, attempt in attempts.items()
            if item_id in found and (found[item_id].status, found[item_id].attempts)
            == (Status.RUNNING, attempt)}
    now = utcnow()
    done = [{**row, "status": Status.DONE, "lease_expires_at": None, "last_error": None,
             "finished_at": now} for row in rows if row["id"] in ours]
    if done:
        session.execute(update(Item), done)
    finish_jobs(session, job_ids)
    return Recorded(ours, {item_id: row.image_key for item_id, row in found.items()})


def fail_items(session: Session, ids: Collection[int], reason: str, *,
               count_attempt: bool = False) -> int:
    """Unfinished items -> failed with `reason` (the attempt counted when `count_attempt`:
    they were never claimed, e.g. their model did not load); how many. Their jobs close if
    nothing else is left to run."""
    values: dict[str, Any] = {"attempts": Item.attempts + 1} if count_attempt else {}
    result = session.execute(
        update(Item).where(Item.id.in_(ids), Item.status.not_in(_FINISHED))
        .values(status=Status.FAILED, last_error=reason[:ERROR_CHARS], lease_expires_at=None,
                finished_at=utcnow(), **values))
    count = cast(CursorResult[Any], result).rowcount
    finish_jobs(session, set(session.scalars(
        select(Item.job_id).where(Item.id.in_(ids)).distinct())))
    return count


def release_items(session: Session, ids: Collection[int], *, worker_host: str | None = None,
                  give_back_attempt: bool = False, last_error: str | None = None) -> None:
    """Running -> queued, the lease dropped (only the items `worker_host` holds, when given):
    handed back for a later delivery. `give_back_attempt` when the run ended through no fault
    of the item (an outage, an interruption); `last_error` says why, when given."""
    values: dict[str, Any] = {}
    if give_back_attempt:
        values["attempts"] = Item.attempts - 1
    if last_error is not None:
        values["last_error"] = last_error[:ERROR_CHARS]
    held = Item.worker_host == worker_host if worker_host else Item.id.is_not(None)
    session.execute(update(Item).where(Item.id.in_(ids), Item.status == Status.RUNNING, held)
                    .values(status=Status.QUEUED, lease_expires_at=None, **values))


def finish_jobs(session: Session, job_ids: Iterable[int]) -> None:
    """Close the jobs none of whose items is still to run: done, or failed if any item failed.

    The job row is locked first. Transactions that finish a job's last items at the same time
    (the parts of one chunk, on parallel store threads) then take turns here, and the last one
    sees the others' items done; unlocked, each could see the other's still running, and the
    job would never close. Sorted, so two transactions never lock jobs in opposite orders."""
    now = utcnow()
    for job_id in sorted(job_ids):
        session.execute(select(Job.id).where(Job.id == job_id).with_for_update())
        open_items = select(Item.id).where(Item.job_id == job_id, Item.status.in_(_OPEN))
        if session.scalar(open_items.limit(1)) is not None:
            continue
        failed = session.scalar(select(Item.id).where(
            Item.job_id == job_id, Item.status == Status.FAILED).limit(1))
        session.execute(update(Job).where(Job.id == job_id, Job.status.not_in(_FINISHED))
                        .values(status=Status.FAILED if failed else Status.DONE, finished_at=now))



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


def retry_job(session: Session, job: Job) -> int:
    """The job's failed items pending again, each with a fresh set of attempts, and the job
    queued until they are run; how many items. With none failed nothing changes: a queued job
    with nothing to run would stay queued for good."""
    count = _rowcount(session.execute(update(Item).where(
        Item.job_id == job.id, Item.status.in_(ITEMS.sources([Status.FAILED], Status.PENDING)))
        .values(status=Status.PENDING, attempts=0, last_error=None, finished_at=None)))
    if count:
        job.status, job.finished_at = JOBS.check(job.status, Status.QUEUED), None
    return count


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
