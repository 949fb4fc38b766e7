"""The job services' changes of state, driven on the index directly (both databases): what each
one changes, what it leaves alone, and that a change the tables do not allow is refused."""
from __future__ import annotations

from datetime import date, timedelta

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from sdq.core.states import Status, TransitionRefused
from sdq.db import transitions
from sdq.db.base import utcnow
from sdq.db.models import Item, Job

from .helpers import add_job, add_schedule


def statuses(session: Session, job: Job) -> list[Status]:
    session.expire_all()
    return list(session.scalars(select(Item.status).where(Item.job_id == job.id)
                                .order_by(Item.row_index)))


def set_rows(session: Session, job: Job, rows: dict[int, Status], **values: object) -> None:
    for row, status in rows.items():
        session.execute(update(Item).where(Item.job_id == job.id, Item.row_index == row)
                        .values(status=status, **values))
    session.commit()


def test_submitted_jobs_run_here_or_are_queued(session: Session) -> None:
    here, there = Job(), Job()
    transitions.start_job(here, embedded=True)
    transitions.start_job(there, embedded=False)
    assert (here.status, there.status) == (Status.RUNNING, Status.QUEUED)


def test_published_items_are_queued_and_stamped_others_left(session: Session) -> None:
    job = add_job(session, ["a", "b", "c"])
    set_rows(session, job, {2: Status.DONE})
    transitions.mark_queued(session, Item.job_id == job.id)
    session.commit()
    assert statuses(session, job) == [Status.QUEUED, Status.QUEUED, Status.DONE]
    stamped = session.scalars(select(Item.queued_at).where(Item.job_id == job.id)
                              .order_by(Item.row_index)).all()
    assert stamped[0] is not None and stamped[2] is None


def test_only_expired_leases_are_handed_back_and_only_of_the_job_asked(session: Session) -> None:
    now = utcnow()
    job, other = add_job(session, ["a", "b"]), add_job(session, ["c"])
    set_rows(session, job, {0: Status.RUNNING}, lease_expires_at=now - timedelta(seconds=1))
    set_rows(session, job, {1: Status.RUNNING}, lease_expires_at=now + timedelta(minutes=5))
    set_rows(session, other, {0: Status.RUNNING}, lease_expires_at=now - timedelta(seconds=1))
    transitions.requeue_expired(session, now, job.id)
    session.commit()
    assert statuses(session, job) == [Status.QUEUED, Status.RUNNING]
    assert statuses(session, other) == [Status.RUNNING]
    transitions.requeue_expired(session, now)
    session.commit()
    assert statuses(session, other) == [Status.QUEUED]


def test_cancel_takes_waiting_items_and_the_job_unless_it_ended(session: Session) -> None:
    job = add_job(session, ["a", "b", "c", "d"], status=Status.QUEUED)
    set_rows(session, job, {1: Status.QUEUED, 2: Status.RUNNING, 3: Status.DONE})
    assert transitions.cancel_job(session, job) == 2
    session.commit()
    assert statuses(session, job) == [Status.CANCELLED, Status.CANCELLED, Status.RUNNING,
                                      Status.DONE]
    assert job.status is Status.CANCELLED and job.finished_at is not None
    ended = add_job(session, ["e", "f"], status=Status.DONE)
    set_rows(session, ended, {1: Status.DONE})
    assert transitions.cancel_job(session, ended) == 1
    assert ended.status is Status.DONE


def test_retry_gives_failed_items_fresh_attempts_and_queues_the_job(session: Session) -> None:
    job = add_job(session, ["a", "b"], status=Status.FAILED)
    set_rows(session, job, {0: Status.FAILED}, attempts=3, last_error="boom",
             finished_at=utcnow())
    set_rows(session, job, {1: Status.DONE})
    transitions.retry_job(session, job)
    session.commit()
    item = session.scalars(select(Item).where(Item.job_id == job.id, Item.row_index == 0)).one()
    assert (item.status, item.attempts, item.last_error, item.finished_at) == (
        Status.PENDING, 0, None, None)
    assert statuses(session, job)[1] is Status.DONE
    assert (job.status, job.finished_at) == (Status.QUEUED, None)


def test_resume_restarts_a_job_unless_it_ended(session: Session) -> None:
    handed_back, ended = Job(status=Status.PENDING), Job(status=Status.FAILED)
    transitions.resume_job(handed_back, embedded=True)
    transitions.resume_job(ended, embedded=True)
    assert (handed_back.status, ended.status) == (Status.RUNNING, Status.FAILED)


def test_an_interrupted_run_hands_its_job_back_only_while_it_runs(session: Session) -> None:
    running, done = add_job(session, ["a"], status=Status.RUNNING), add_job(session, ["b"],
                                                                              status=Status.DONE)
    for job in (running, done):
        transitions.hand_back_job(session, job.id)
    session.commit()
    session.expire_all()
    assert (running.status, done.status) == (Status.PENDING, Status.DONE)


def test_a_change_the_tables_do_not_allow_is_refused(session: Session) -> None:
    with pytest.raises(TransitionRefused, match="a job cannot go from done to running"):
        transitions.start_job(Job(status=Status.DONE), embedded=True)


def test_a_deleted_job_leaves_no_rows(session: Session) -> None:
    job, other = add_job(session, ["a", "b"]), add_job(session, ["c"])
    transitions.lock_job(session, job.id)
    assert transitions.delete_job(session, job.id) == 2
    session.commit()
    assert session.get(Job, job.id) is None
    assert session.scalars(select(Item.job_id)).all() == [other.id]


def test_a_schedules_last_run_day_only_moves_forward(session: Session) -> None:
    schedule = add_schedule(session)
    for day in (date(2026, 3, 2), date(2026, 3, 1)):
        transitions.mark_schedule_ran(session, schedule.id, day)
    session.commit()
    session.expire_all()
    assert schedule.last_run_day == date(2026, 3, 2)
