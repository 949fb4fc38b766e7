"""Fault injection on a real distributed run: services cut through a loopback TCP proxy
(tests/faults.py), workers killed or stopped, work lost from Redis. Each scenario ends with
every item done exactly once, or failed with its true reason, with no manual command.

Outages here are short (a little over the old fixed retry budget of about 15 s, or the
window set small); bench/bench_faults.py runs the full-length cuts (docs/queue.md)."""
from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Callable

import pytest
from sqlalchemy import update
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from sdq.db.base import utcnow
from sdq.db.models import Item, Status
from sdq.db.session import open_database
from sdq.jobs.broker import queue_name
from sdq.images.storage import open_storage
from sdq.jobs.lifecycle import cancel_job, sweep
from sdq.jobs.submit import identify_model, submit
from sdq.core.settings import Settings
from sdq.worker.reconciler import Reconciler
from tests.faults import TcpProxy
from sdq.cli.common import follow
from tests.services import clear_queues

from .cluster import WorkerProcess, wait_for
from .conftest import job_items, queued_job, specs
from .test_distributed import assert_exactly_once, wait_until_done
from .test_worker_loss import running_batch_of

SWEEP = {"SDQ_RECONCILE_INTERVAL": "1"}
CUT_S = 16.0
"""Longer than the fixed retry budget workers had before the outage window (about 15 s)."""


@pytest.fixture
def proxies(distributed_env: dict[str, str]) -> Iterator[dict[str, TcpProxy]]:
    """The worker's PostgreSQL, Redis and S3 reached through proxies the test can cut; the
    test's own calls go direct."""
    upstreams = {"postgresql": ("127.0.0.1", 5432), "redis": ("127.0.0.1", 6379),
                 "s3": ("127.0.0.1", int(distributed_env["AWS_ENDPOINT_URL"].rsplit(":", 1)[1]))}
    cuts = {name: TcpProxy(address) for name, address in upstreams.items()}
    try:
        yield cuts
    finally:
        for proxy in cuts.values():
            proxy.close()


def orphaned_job(settings: Settings, tiny_checkpoint: Path) -> int:
    """A job whose messages Redis lost, with one item left running by a worker that died."""
    model = identify_model(tiny_checkpoint)
    result = submit(settings, specs(4, steps=1), model=model, batch_size=2)
    clear_queues(settings.broker_url or "", queue_name(model.sha256))
    engine = open_database(settings.database_url)
    first = job_items(engine, result.job_id)[0]
    with Session(engine) as session, session.begin():
        session.execute(update(Item).where(Item.id == first.id).values(
            status=Status.RUNNING, attempts=1, worker_host="dead@host",
            lease_expires_at=utcnow() - timedelta(seconds=1)))
    return result.job_id


def test_a_worker_recovers_lost_work_rides_out_each_service_cut_and_stops_cleanly(
        distributed: Settings, distributed_env: dict[str, str], proxies: dict[str, TcpProxy],
        start_worker: Callable[[str], WorkerProcess], tiny_checkpoint: Path) -> None:
    """One worker (one start, to keep the suite short), three scenarios in turn:

    1. work lost before it started (messages gone from Redis, an expired lease) is found by
       its own reconcile;
    2. PostgreSQL, Redis and S3 refused in turn (each after one more image is done), and S3
       slowed: each is waited out, every item done exactly once, no attempt charged;
    3. SIGTERM to its whole process group, as docker and systemd send it: the running batch
       finishes and is recorded, and it exits 0.
    """
    lost = orphaned_job(distributed, tiny_checkpoint)
    distributed_env.update({
        **SWEEP, "SDQ_DATABASE_URL": proxies["postgresql"].url(distributed_env["SDQ_DATABASE_URL"]),
        "SDQ_BROKER_URL": proxies["redis"].url(distributed_env["SDQ_BROKER_URL"]),
        "AWS_ENDPOINT_URL": proxies["s3"].url(distributed_env["AWS_ENDPOINT_URL"])})
    worker = start_worker("faults")
    worker.wait_ready()
    wait_until_done(distributed, lost, timeout=120)
    assert_exactly_once(distributed, lost, 4)

    engine = open_database(distributed.database_url)
    model = identify_model(tiny_checkpoint)
    result = submit(distributed, specs(10, steps=1), model=model, batch_size=2,
                    batches_per_message=1)

    def more_done(than: int) -> int | None:
        """How many are done, once more than `than` are (or all are)."""
        done = sum(i.status == Status.DONE for i in job_items(engine, result.job_id))
        return done if done > than or done == result.items else None

    seen = 0
    for service, mode in (("postgresql", "refuse"), ("redis", "refuse"), ("s3", "refuse"),
                          ("s3", "slow")):
        seen = wait_for("another image to be done", lambda: more_done(seen), every=0.1)
        proxies[service].cut(mode, delay=0.3)
        time.sleep(CUT_S if mode == "refuse" else 4)
        proxies[service].restore()
    wait_until_done(distributed, result.job_id, timeout=180)
    # Its first 4 are the lost job's images, reused from the cache (no model call, no attempt);
    # the other 6 made once each, under this job's keys.
    items = job_items(engine, result.job_id)
    made = [i for i in items if i.reused_from is None]
    assert {i.status for i in items} == {Status.DONE} and len(made) == 6
    assert sorted(open_storage(distributed.storage_url).list(f"{result.job_id}/")) == sorted(
        i.image_key for i in made)
    assert {i.attempts for i in made} == {1}
    assert {i.image_key for i in items if i.reused_from} <= set(
        open_storage(distributed.storage_url).list(f"{lost}/"))

    stopping = submit(distributed, specs(4, steps=5), model=model, batch_size=2,
                      batches_per_message=1)
    batch = wait_for("a batch to run", lambda: running_batch_of(engine, stopping.job_id, worker),
                     every=0.05)
    os.killpg(worker.process.pid, signal.SIGTERM)
    assert worker.process.wait(timeout=90) == 0
    items = {i.id: i for i in job_items(engine, stopping.job_id)}
    assert {(items[i.id].status, items[i.id].attempts) for i in batch} == {(Status.DONE, 1)}
    assert "WorkerLostError" not in worker.log.read_text()
    # The rest stays queued: cancelled, so that later tests' workers (same database, same
    # model queue) do not reconcile it, make it, and offer it to their jobs' result cache.
    cancel_job(distributed, stopping.job_id)


def sessions_of(url: str, application: str) -> list[str]:
    """The states PostgreSQL shows for the sessions of `application`."""
    with open_database(url).connect() as connection:
        return list(connection.exec_driver_sql(
            "SELECT state FROM pg_stat_activity WHERE application_name = %s",
            (application,)).scalars())


def while_redis_hangs(proxy: TcpProxy, call: Callable[[], object], url: str, application: str,
                      stop: Callable[[], None]) -> None:
    """Run `call` in a thread with every Redis byte held back; once it has reached Redis,
    no session of `application` may be idle in transaction. `stop` lets `call` end."""
    proxy.cut("blackhole")
    reached = proxy.accepted
    ended: list[object] = []

    def run() -> None:
        try:
            ended.append(call())
        except Exception as exc:  # noqa: BLE001 - Redis timing out is what the test expects
            ended.append(exc)

    thread = threading.Thread(target=run, name="hung-on-redis")
    thread.start()
    try:
        wait_for("the call to reach Redis", lambda: proxy.accepted > reached, every=0.05)
        states = sessions_of(url, application)
        assert states and "idle in transaction" not in states, states
    finally:
        proxy.restore()
        stop()
        thread.join(60)
    assert not thread.is_alive() and ended


def test_no_transaction_stays_open_while_redis_hangs(
        distributed: Settings, distributed_env: dict[str, str],
        proxies: dict[str, TcpProxy]) -> None:
    """Issue 25.7: the reconcile sweep asks Redis how many messages wait, and `submit --wait`
    / `sdq watch` which workers serve the job, with no database transaction open, so a Redis
    that does not answer (every byte held back) leaves no session idle in transaction,
    holding its locks, while they wait."""
    name = f"sdq-hang-{os.getpid()}"
    env = {**distributed_env,
           "SDQ_DATABASE_URL": make_url(distributed.database_url).update_query_dict(
               {"application_name": name}).render_as_string(hide_password=False),
           "SDQ_BROKER_URL": proxies["redis"].url(distributed_env["SDQ_BROKER_URL"])}
    settings = Settings.load(env)
    engine = open_database(settings.database_url)
    job_id, _ = queued_job(engine, "7" * 64, specs(2), 8, prefix="stale")  # open, past a grace of 0
    try:
        while_redis_hangs(proxies["redis"], lambda: sweep(
            settings, engine, grace_s=0, waiting=Reconciler(settings, 0).waiting),
            distributed.database_url, name, lambda: None)
        while_redis_hangs(proxies["redis"], lambda: follow(
            settings, job_id, poll_s=0.05, queues=[queue_name("7" * 64)]),
            distributed.database_url, name, lambda: cancel_job(distributed, job_id))
    finally:
        # Later tests share the database and the broker: nothing of this job is left to them.
        cancel_job(distributed, job_id)
        clear_queues(distributed.broker_url or "", queue_name("7" * 64))
        engine.dispose()
