"""The one Celery task: run the batches a message carries. Thin on purpose: the payload is
item ids, and the runner re-reads the rows.

The message is acknowledged when the run returns, once every chunk is denoised and queued for
storing; the store threads finish it while the next message denoises, holding the items'
leases until their rows are written. A pool process that stops (warm shutdown) stores what it
holds first. Should it die instead, the leases run out and the workers' reconcile takes the
items again."""
from __future__ import annotations

import signal
import threading
from functools import cache
from typing import Any

from celery import Task, signals
from sqlalchemy.exc import OperationalError

from sdq.core.batch import Batch
from sdq.core.settings import Settings
from sdq.db.session import open_database
from sdq.jobs.broker import TASK_NAME
from sdq.worker.app import app
from sdq.worker.claims import LEASE_S
from sdq.worker.factory import runner_from_settings
from sdq.worker.heartbeat import Heartbeat
from sdq.worker.outage import TransientError
from sdq.worker.reconciler import Reconciler
from sdq.worker.runner import Runner


@cache
def settings() -> Settings:
    """The worker process's settings, read when first needed, never at import."""
    return Settings.load()


class BatchTask(Task):
    """Keeps the process's runner, and with it the loaded model, from one message to the next.

    Celery creates one instance of a task per process, so this is the process's state; the
    model itself is loaded on the first batch, never while the pool process starts.
    """

    _runner: Runner | None = None
    _lock = threading.Lock()  # the heartbeat thread asks for the runner too

    @property  # type: ignore[override]
    def max_retries(self) -> int:
        """Deliveries of a message that outlasted the outage window, SDQ_MAX_ATTEMPTS: read
        from the settings when Celery asks, not when the module is imported."""
        return settings().max_attempts

    @staticmethod
    def runner(worker_name: str) -> Runner:
        """The process's one runner, built by whichever asks first, the task or the heartbeat.
        Kept on BatchTask itself: the task's class is a subclass Celery makes, where an
        attribute set through `cls` would hide this one, and the heartbeat and the shutdown
        hook would see another runner than the task's."""
        with BatchTask._lock:
            if BatchTask._runner is None:
                engine = open_database(settings().database_url)
                BatchTask._runner = runner_from_settings(settings(), engine, settings().model,
                                                         worker_name)
            return BatchTask._runner

    @staticmethod
    def drain() -> None:
        """Store what this process's runner still holds (it is shutting down)."""
        with BatchTask._lock:
            runner = BatchTask._runner
        if runner is not None:
            runner.drain()


@app.task(bind=True, base=BatchTask, name=TASK_NAME,
          autoretry_for=(TransientError, OperationalError),
          retry_backoff=True, retry_backoff_max=60)
def run_batches(self: BatchTask, batches: list[dict[str, Any]]) -> None:
    """Run `batches` (each `{"id": ..., "items": [item ids]}`) on this worker's model."""
    self.runner(self.request.hostname).run([Batch.from_json(b) for b in batches], wait=False)


_node: dict[str, str] = {}
"""This worker's node name, learnt in the main process before the pool forks."""


@signals.celeryd_after_setup.connect
def _remember_node_name(sender: str, **_: Any) -> None:
    _node["name"] = sender


@signals.worker_process_init.connect
def _start_heartbeat(**_: Any) -> None:
    """Each pool process reports itself, idle or busy, for `sdq workers`, and reconciles
    lost work every SDQ_RECONCILE_INTERVAL (threads; the pool process must not block here)."""
    # docker and systemd send SIGTERM to the whole process group. The main process turns it
    # into Celery's warm shutdown (it lets the running task finish, then stops the pool
    # through its pipe); a pool process that took it too would die mid-batch
    # (WorkerLostError), so the pool process ignores it.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    name = _node.get("name", "sdq")
    Heartbeat(settings(), name, lambda: BatchTask.runner(name)).start()
    if settings().reconcile_interval:
        Reconciler(settings(), grace_s=min(LEASE_S, settings().visibility_timeout)).start()


@signals.worker_process_shutdown.connect
@signals.worker_shutdown.connect
def _store_what_is_held(**_: Any) -> None:
    """A stopping worker (a pool process, or the main process of a solo pool) first stores
    the images its last runs queued: warm shutdown finishes the running batch, and the batch
    ends when its rows are written."""
    BatchTask.drain()
