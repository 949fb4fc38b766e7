"""Claims on a real index (the test's own SQLite file), without a model: what claiming,
failing, handing back and renewing leases do to the rows."""
from __future__ import annotations

import threading
from datetime import timedelta

from sqlalchemy import update
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from sdq.core.batch import Batch
from sdq.db.base import utcnow
from sdq.db.models import Item, Job, Status
from sdq.worker.claims import Claims, LeaseKeeper, Work
from sdq.worker.outage import TransientError

from .conftest import job_items, queued_job, specs

MODEL = "a" * 64
OTHER_MODEL = "b" * 64


def claims(engine: Engine, name: str = "w1", *, lease_s: float = 120, max_attempts: int = 3) -> Claims:
    return Claims(sessionmaker(engine, expire_on_commit=False), worker_name=name, lease_s=lease_s,
                  max_attempts=max_attempts)


def key_of(work: Work) -> str:
    return f"key-{work.params.seed}"


def set_items(engine: Engine, ids: list[int], **values: object) -> None:
    with Session(engine) as session, session.begin():
        session.execute(update(Item).where(Item.id.in_(ids)).values(**values))


def job_status(engine: Engine, job_id: int) -> Status:
    with Session(engine) as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job.status


def test_a_claim_takes_the_free_items_under_a_lease_and_skips_finished_ones(engine: Engine) -> None:
    job_id, [batch] = queued_job(engine, MODEL, specs(3), 8, prefix="c")
    ids = list(batch.item_ids)
    set_items(engine, ids[:1], status=Status.CANCELLED)
    mine = claims(engine)
    try:
        work = mine.take(batch, MODEL, key_of)
        assert [w.id for w in work] == ids[1:] and {w.attempt for w in work} == {1}
        assert mine.held() == set(ids[1:])
    finally:
        mine.close()
    rows = job_items(engine, job_id)
    assert rows[0].status == Status.CANCELLED and rows[0].attempts == 0
    assert [(r.status, r.attempts, r.worker_host, r.batch_id, r.cache_key) for r in rows[1:]] == [
        (Status.RUNNING, 1, "w1", batch.id, f"key-{r.seed}") for r in rows[1:]]
    assert all(r.lease_expires_at > utcnow() + timedelta(seconds=100) for r in rows[1:])


def test_items_of_another_model_and_spent_ones_fail(engine: Engine) -> None:
    """A worker never runs another model's items: on its own queue they mean its file changed
    since they were submitted, so they fail saying so; an item already claimed `max_attempts`
    times fails with its last error; their jobs close."""
    ours, [our_batch] = queued_job(engine, MODEL, specs(1), 8, prefix="ours")
    theirs, [their_batch] = queued_job(engine, OTHER_MODEL, specs(1), 8, prefix="theirs")
    set_items(engine, list(our_batch.item_ids), attempts=3, last_error="MemoryError: no buffer")
    mine = claims(engine)
    try:
        assert mine.take(Batch("mixed", our_batch.item_ids + their_batch.item_ids), MODEL, key_of,
                         "/models/tiny.safetensors") == []
    finally:
        mine.close()
    [spent], [other] = job_items(engine, ours), job_items(engine, theirs)
    assert (spent.status, spent.last_error) == (
        Status.FAILED, "gave up after 3 attempts; last error: MemoryError: no buffer")
    assert job_status(engine, ours) == Status.FAILED
    assert (other.status, other.attempts, other.worker_host) == (Status.FAILED, 0, None)
    assert other.last_error.startswith("model /models/tiny.safetensors changed since the job was submitted")
    assert job_status(engine, theirs) == Status.FAILED


def test_handing_back_gives_the_attempt_back_unless_the_item_is_at_fault(engine: Engine) -> None:
    job_id, [batch] = queued_job(engine, MODEL, specs(4), 8, prefix="h")
    mine = claims(engine)
    try:
        first, second, third, fourth = (w.id for w in mine.take(batch, MODEL, key_of))
        mine.hand_back([first], KeyboardInterrupt())
        mine.hand_back([second], TransientError("storing images failed 9 times over 1800s: down"))
        mine.hand_back([third], MemoryError("no buffer"))
        other = claims(engine, "w2")
        try:  # the fourth is taken over by another worker: not ours to hand back any more
            set_items(engine, [fourth], status=Status.QUEUED, lease_expires_at=None)
            assert [w.id for w in other.take(Batch("again", (fourth,)), MODEL, key_of)] == [fourth]
            mine.hand_back([fourth], MemoryError("no buffer"))
        finally:
            other.close()
    finally:
        mine.close()
    rows = job_items(engine, job_id)
    assert [(r.status, r.attempts, r.last_error, r.lease_expires_at) for r in rows[:3]] == [
        (Status.QUEUED, 0, None, None),
        (Status.QUEUED, 0, "storing images failed 9 times over 1800s: down", None),
        (Status.QUEUED, 1, "MemoryError: no buffer", None)]
    assert (rows[3].status, rows[3].worker_host, rows[3].attempts) == (Status.RUNNING, "w2", 2)


def test_failing_items_closes_their_job(engine: Engine) -> None:
    """A model that does not load fails items never claimed: each is charged one attempt."""
    job_id, [batch] = queued_job(engine, MODEL, specs(2), 8, prefix="f")
    assert claims(engine).fail(batch.item_ids, "model: no such file", count_attempt=True) == 2
    assert [(r.status, r.attempts, r.last_error) for r in job_items(engine, job_id)] == [
        (Status.FAILED, 1, "model: no such file")] * 2
    assert job_status(engine, job_id) == Status.FAILED


def test_the_lease_keeper_renews_what_still_runs_and_forgets_the_rest(engine: Engine) -> None:
    """Driven by hand (`renew`), as its thread does every third of the lease."""
    job_id, [batch] = queued_job(engine, MODEL, specs(2), 8, prefix="k")
    sessions = sessionmaker(engine, expire_on_commit=False)
    mine = claims(engine)
    try:
        running, recorded = (w.id for w in mine.take(batch, MODEL, key_of))
    finally:
        mine.close()
    soon = utcnow() + timedelta(seconds=1)
    set_items(engine, [running, recorded], lease_expires_at=soon)
    set_items(engine, [recorded], status=Status.DONE, lease_expires_at=None)
    keeper = LeaseKeeper(sessions, "w1", lease_s=120)
    keeper.hold([running, recorded])
    keeper.renew()
    assert keeper.held() == {running}
    rows = {r.id: r for r in job_items(engine, job_id)}
    assert rows[running].lease_expires_at > soon + timedelta(seconds=100)
    assert rows[recorded].lease_expires_at is None


def test_a_batch_this_worker_still_holds_is_skipped_at_once(engine: Engine) -> None:
    """Delivered twice while its images are still being stored: the worker's own live leases
    are not waited for (another worker's would be, up to the lease, an hour here)."""
    job_id, [batch] = queued_job(engine, MODEL, specs(2), 8, prefix="d")
    mine = claims(engine, lease_s=3600)
    try:
        assert len(mine.take(batch, MODEL, key_of)) == 2
        again: list[list[int]] = []
        second = threading.Thread(target=lambda: again.append(
            [w.id for w in mine.take(batch, MODEL, key_of)]), daemon=True)
        second.start()
        second.join(timeout=60)
        assert not second.is_alive() and again == [[]]
    finally:
        mine.close()
    assert {(r.status, r.attempts) for r in job_items(engine, job_id)} == {(Status.RUNNING, 1)}
