"""Operations on queued work, judged from the database: reconcile, retry and cancel.

Redis only carries work; anything it lost is rebuilt from the item rows. Re-enqueueing an item
that still has a message is harmless: the runner skips whatever is done or leased.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Callable

from sqlalchemy import and_, func, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement

from sdq.core.jobspec import default_batch_size
from sdq.core.settings import Settings
from sdq.core.states import WAITING, Status
from sdq.db import transitions
from sdq.db.base import utcnow
from sdq.db.models import Item, Model
from sdq.db.queries import get_job
from sdq.jobs.adapters import with_folders
from sdq.db.session import open_database
from sdq.jobs.submit import (
    RunnerFactory,
    check_runner,
    dispatch,
    handed_back_on_interrupt,
    plan_batches,
)

if TYPE_CHECKING:
    from sdq.core.batch import RunReport


@dataclass(frozen=True)
class Requeued:
    """What an operation sent back to the queue (or ran, in embedded mode)."""

    items: int
    batches: int
    report: RunReport | None = None
    """Embedded mode: the items ran here, in-process, and this is what they did."""


def _requeue(settings: Settings, engine: Engine, session: Session, where: ColumnElement[bool],
             prefix: str, make_runner: RunnerFactory | None = None) -> Requeued:
    """Plan batches for the items matching `where`, commit, then dispatch them."""
    planned = plan_batches(session, where, default_batch_size(settings.batch_size), prefix=prefix)
    session.commit()
    report = dispatch(settings, engine, planned, where, make_runner=make_runner)
    batches = [b for group in planned.values() for b in group]
    return Requeued(sum(len(b.item_ids) for b in batches), len(batches), report)


def reconcile(settings: Settings, make_runner: RunnerFactory | None = None) -> Requeued:
    """Re-enqueue every item that should be in the queue: pending (never enqueued), queued
    (its message may be gone with a flushed Redis) and running under an expired lease (its
    worker is gone). Items of finished or cancelled jobs are left alone. With no broker they
    run here, on a runner from `make_runner`."""
    check_runner(settings, make_runner)
    engine = open_database(settings.database_url)
    try:
        with Session(engine) as session:
            transitions.requeue_expired(session, utcnow())
            waiting = Item.status.in_(WAITING)
            return _requeue(settings, engine, session, waiting, f"r{int(time.time())}",
                            make_runner)
    finally:
        engine.dispose()


def sweep(settings: Settings, engine: Engine, *, grace_s: float,
          waiting: Callable[[str], int]) -> Requeued:
    """The reconcile every worker runs by itself (`worker.reconciler`), safe when several run
    at once and cheap when nothing is wrong.

    Running items whose lease expired go back to queued (one conditional UPDATE). Open items
    (pending or queued) that have waited longer than `grace_s` since they were last enqueued
    (or recorded) are re-enqueued, but only for models whose queue is empty (`waiting(sha256)`
    messages): with messages still waiting, theirs may be among them, and a backlog is never
    doubled. Each item is taken by a conditional UPDATE that stamps `queued_at` and returns
    the ids it changed, so of several sweepers only one re-enqueues a given item, and not
    again before another `grace_s`. A message sent twice is harmless: the runner skips what
    is done or leased."""
    now = utcnow()
    cutoff = now - timedelta(seconds=grace_s)
    with Session(engine) as session, session.begin():
        transitions.requeue_expired(session, now)
    stale = and_(Item.status.in_(WAITING), func.coalesce(Item.queued_at, Item.created_at) < cutoff)
    # Read, commit, then ask the broker (a slow or cut Redis takes seconds per model), then
    # write in a new transaction: no transaction, nor its locks, stays open over a network call.
    with Session(engine) as session, session.begin():
        candidates = list(session.scalars(
            select(Model.sha256).join(Item, Item.model_id == Model.id).where(stale).distinct()))
    models = [sha256 for sha256 in candidates if waiting(sha256) == 0]
    if not models:
        return Requeued(0, 0)
    with Session(engine) as session:
        with session.begin():
            taken = list(session.scalars(
                update(Item).where(stale, Item.model_id.in_(
                    select(Model.id).where(Model.sha256.in_(models))))
                .values(queued_at=now).returning(Item.id)
                .execution_options(synchronize_session=False)))
        if not taken:
            return Requeued(0, 0)
        return _requeue(settings, engine, session, Item.id.in_(taken), f"s{int(time.time())}")


def retry_job(settings: Settings, job_id: int, make_runner: RunnerFactory | None = None) -> Requeued:
    """Give the job's failed items a fresh set of attempts and enqueue them again (in
    embedded mode: run them again here, on a runner from `make_runner`; `Requeued.report`
    says how that went). A job without failed items is left as it is (`Requeued(0, 0)`)."""
    check_runner(settings, make_runner)
    engine = open_database(settings.database_url)
    try:
        with Session(engine) as session:
            if not transitions.retry_job(session, get_job(session, job_id)):
                return Requeued(0, 0)
            where = and_(Item.job_id == job_id, Item.status == Status.PENDING)
            return _requeue(settings, engine, session, where, f"j{job_id}-retry{int(time.time())}",
                            make_runner)
    finally:
        engine.dispose()


@dataclass(frozen=True)
class Resumed:
    """What `resume_job` took up again, and what it had to leave to a live lease."""

    items: int
    batches: int
    leased: int
    """Items running under a lease that has not expired: maybe another run is alive."""
    report: RunReport | None
    """Embedded mode: what the in-process run did."""


def resume_job(settings: Settings, job_id: int,
               on_planned: Callable[[int, int], Callable[[int], None]] | None = None,
               on_step: Callable[[int, int, int], None] | None = None,
               make_runner: RunnerFactory | None = None) -> Resumed:
    """Run again the job's items an interrupted run left: pending, queued, and running under
    an expired lease (their process is gone); items done, failed or cancelled stay as they
    are, so nothing is generated twice. A job with nothing left to run is closed (done, or
    failed if any item failed), whatever status it was left in. In embedded mode they run here, through the same
    runner as a submit, from `make_runner` (`on_planned(total, finished)` is called first, when
    there is something to run, and returns the `on_recorded` callback); with a broker they are
    enqueued."""
    check_runner(settings, make_runner)
    engine = open_database(settings.database_url)
    try:
        with Session(engine) as session:
            job = get_job(session, job_id)
            transitions.requeue_expired(session, utcnow(), job_id)
            leased = session.scalar(select(func.count()).where(
                Item.job_id == job_id, Item.status == Status.RUNNING)) or 0
            where = and_(Item.job_id == job_id, Item.status.in_(WAITING))
            # The submit's own batch size, when it recorded one, and its LoRA and embeddings
            # folders, for a run here.
            recorded = job.defaults or {}
            size = default_batch_size(recorded.get("batch_size"), settings.batch_size)
            settings = with_folders(settings, recorded.get("lora_dirs") or (),
                                    recorded.get("embeddings_dir"))
            planned = plan_batches(session, where, int(size),
                                   prefix=f"j{job_id}-resume{int(time.time())}")
            if planned:
                transitions.resume_job(job, embedded=settings.embedded)
            elif not leased:  # nothing open: close a job left pending, queued or running
                transitions.finish_jobs(session, [job_id])
            total = job.item_count
            open_count = sum(len(b.item_ids) for group in planned.values() for b in group)
            session.commit()
        # No progress for nothing to run: a bar at 100% over "nothing to resume" misleads.
        on_recorded = (on_planned(total, total - open_count - leased)
                       if on_planned and planned else None)
        report = None
        if planned:
            with handed_back_on_interrupt(engine, job_id):
                report = dispatch(settings, engine, planned, where, on_recorded=on_recorded,
                                  on_step=on_step, make_runner=make_runner)
        return Resumed(open_count, sum(len(group) for group in planned.values()), leased, report)
    finally:
        engine.dispose()


def cancel_job(settings: Settings, job_id: int) -> int:
    """Cancel the job's pending and queued items (running batches finish); returns how many.
    Their messages stay in the broker and are skipped when they arrive."""
    engine = open_database(settings.database_url)
    try:
        with Session(engine) as session, session.begin():
            return transitions.cancel_job(session, get_job(session, job_id))
    finally:
        engine.dispose()
