"""The Celery app: configuration only; the task lives in `tasks`, the work in `runner`.

`celery -A sdq.worker.app worker` finds `app` here, built from the settings of the process
(`SDQ_BROKER_URL`, `SDQ_VISIBILITY_TIMEOUT`); `sdq submit` and `sdq reconcile` build their own
with `create_app` to publish. There is no result backend: the database holds every outcome.
"""
from __future__ import annotations

from celery import Celery

from sdq.sdmodel.params import short_hash
from sdq.worker.settings import Settings

TASK_NAME = "sdq.run_batches"
QUEUE_PREFIX = "sdq."


PRIORITIES = range(10)
"""Job priorities: higher is taken first. Redis has no priority queue; kombu keeps one list per
level and pops the lists in order, so each level here is a list of its own."""


def broker_priority(priority: int) -> int:
    """kombu's Redis transport pops level 0 first: the reverse of a job's priority. Values
    outside the range (recorded before it was enforced) count as its nearest end."""
    return PRIORITIES.stop - 1 - min(max(priority, PRIORITIES.start), PRIORITIES.stop - 1)


def queue_name(model_sha256: str) -> str:
    """One queue per model, named by its short hash: a worker only receives work it can run."""
    return f"{QUEUE_PREFIX}{short_hash(model_sha256)}"


def create_app(settings: Settings) -> Celery:
    """An app on the settings' broker (an in-memory one in embedded mode, never used there)."""
    app = Celery("sdq", broker=settings.broker_url or "memory://", include=["sdq.worker.tasks"],
                 set_as_current=False)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        result_backend=None,
        # At-least-once: a message goes back to the queue if its worker dies mid-batch; the
        # runner's leases and idempotent recording make the results exactly-once.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        # An unacknowledged message (its worker vanished) is redelivered after this long; the
        # sweep that finds such messages runs every quarter of it (kombu's default sweep,
        # 100 s apart, would dominate the redelivery time of a short timeout).
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout,
            "unacked_restore_interval": max(1, min(60, settings.visibility_timeout // 4)),
            "unacked_restore_throttle": 1,
            "priority_steps": list(PRIORITIES),
            "sep": ":",
        },
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
    )
    return app


app = create_app(Settings.load())
