"""Fault injection on a real distributed run: services cut through a loopback TCP proxy
(tests/faults.py), workers killed or stopped, work lost from Redis. Each scenario ends with
every item done exactly once, or failed with its true reason, with no manual command.

Outages here are short (a little over the old fixed retry budget of about 15 s, or the
window set small); bench/bench_faults.py runs the full-length cuts (docs/queue.md)."""
from __future__ import annotations

import os
import signal
from datetime import timedelta
from pathlib import Path
from typing import Callable

from sqlalchemy import update
from sqlalchemy.orm import Session

from sdq.db.base import utcnow
from sdq.db.models import Item, Status
from sdq.db.session import open_database
from sdq.worker.app import queue_name
from sdq.worker.jobs.submit import identify_model, submit
from sdq.worker.settings import Settings
from tests.services import clear_queues

from .cluster import WorkerProcess, wait_for
from .conftest import job_items, specs
from .test_distributed import assert_exactly_once, wait_until_done
from .test_worker_loss import running_batch_of

SWEEP = {"SDQ_RECONCILE_INTERVAL": "1"}


def test_lost_messages_and_expired_leases_are_reconciled_by_the_workers(
        distributed: Settings, distributed_env: dict[str, str],
        start_worker: Callable[[str], WorkerProcess], tiny_checkpoint: Path) -> None:
    """Redis lost the job's messages, and one item was left running by a worker that died:
    a worker started afterwards finds both by itself."""
    model = identify_model(tiny_checkpoint)
    result = submit(distributed, specs(4, steps=1), model=model, batch_size=2)
    clear_queues(distributed.broker_url or "", queue_name(model.sha256))
    engine = open_database(distributed.database_url)
    first = job_items(engine, result.job_id)[0]
    with Session(engine) as session, session.begin():
        session.execute(update(Item).where(Item.id == first.id).values(
            status=Status.RUNNING, attempts=1, worker_host="dead@host",
            lease_expires_at=utcnow() - timedelta(seconds=1)))
    distributed_env.update(SWEEP)
    start_worker("sweeper").wait_ready()
    wait_until_done(distributed, result.job_id, timeout=120)
    assert_exactly_once(distributed, result.job_id, 4)


def test_sigterm_to_the_process_group_lets_the_running_batch_finish(
        distributed: Settings, start_worker: Callable[[str], WorkerProcess],
        tiny_checkpoint: Path) -> None:
    """What docker and systemd do: SIGTERM to every process of the worker at once."""
    worker = start_worker("group")
    worker.wait_ready()
    result = submit(distributed, specs(4, steps=5), model=identify_model(tiny_checkpoint),
                    batch_size=2, batches_per_message=1)
    engine = open_database(distributed.database_url)
    batch = wait_for("a batch to run", lambda: running_batch_of(engine, result.job_id, worker),
                     every=0.05)
    os.killpg(worker.process.pid, signal.SIGTERM)
    assert worker.process.wait(timeout=90) == 0
    items = {i.id: i for i in job_items(engine, result.job_id)}
    assert {(items[i.id].status, items[i.id].attempts) for i in batch} == {(Status.DONE, 1)}
    assert "WorkerLostError" not in worker.log.read_text()
