"""Workers dying mid-batch: the batch comes back, another process finishes it, and every item
is still recorded exactly once."""
from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Callable

import pytest

from sdq.db.models import Item, Status
from sdq.db.session import open_database
from sdq.jobs.lifecycle import cancel_job
from sdq.jobs.submit import identify_model, submit
from sdq.core.settings import Settings
from tests.services import in_queue

from .cluster import WorkerProcess, wait_for
from .conftest import job_items, specs
from .test_distributed import assert_exactly_once, wait_until_done


def running_batch_of(engine, job_id: int, worker: WorkerProcess) -> list[Item] | None:  # type: ignore[no-untyped-def]
    """The items `worker` is running right now, if any."""
    running = [i for i in job_items(engine, job_id)
               if i.status == Status.RUNNING and i.worker_host.startswith(f"{worker.name}@")]
    return running or None


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["pool process", "whole worker"])
def test_a_batch_cut_short_is_finished_elsewhere(
        loss: str, distributed: Settings, start_worker: Callable[[str], WorkerProcess],
        tiny_checkpoint: Path) -> None:
    victim, survivor = start_worker("victim"), start_worker("survivor")
    victim.wait_ready()
    survivor.wait_ready()
    # Batches long enough (5 steps) that the kill lands while one is running.
    result = submit(distributed, specs(4, steps=5), model=identify_model(tiny_checkpoint),
                    batch_size=2, batches_per_message=1)
    engine = open_database(distributed.database_url)
    batch = wait_for("the victim to run a batch",
                     lambda: running_batch_of(engine, result.job_id, victim), every=0.05)
    if loss == "pool process":
        os.kill(victim.record()["pid"], signal.SIGKILL)
    else:
        victim.kill_group()
    cut = {i.id: i for i in job_items(engine, result.job_id) if i.id in {b.id for b in batch}}
    assert {(i.status, i.attempts) for i in cut.values()} == {(Status.RUNNING, 1)}

    wait_until_done(distributed, result.job_id, timeout=150)
    assert_exactly_once(distributed, result.job_id, 4)
    after = {i.id: i for i in job_items(engine, result.job_id)}
    assert {after[i].attempts for i in cut} == {2}
    if loss == "whole worker":
        assert {after[i].worker_host.split("@")[0] for i in cut} == {survivor.name}


@pytest.mark.slow
def test_sigterm_finishes_the_running_batch_and_leaves_the_rest_queued(
        distributed: Settings, start_worker: Callable[[str], WorkerProcess],
        tiny_checkpoint: Path) -> None:
    worker = start_worker("stopping")
    worker.wait_ready()
    result = submit(distributed, specs(4, steps=5), model=identify_model(tiny_checkpoint),
                    batch_size=2, batches_per_message=1)
    engine = open_database(distributed.database_url)
    batch = wait_for("a batch to run", lambda: running_batch_of(engine, result.job_id, worker),
                     every=0.05)
    worker.process.send_signal(signal.SIGTERM)
    assert worker.process.wait(timeout=90) == 0
    items = {i.id: i for i in job_items(engine, result.job_id)}
    assert {(items[i.id].status, items[i.id].attempts) for i in batch} == {(Status.DONE, 1)}
    assert {i.status for i in items.values()} == {Status.DONE, Status.QUEUED}
    assert in_queue(distributed.broker_url or "", result.queue or "") == 1
    cancel_job(distributed, result.job_id)  # later tests' workers must not reconcile the rest
