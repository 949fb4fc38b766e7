"""The broker as publishers and workers share it: the task's name, one queue per model, job
priorities as kombu's levels, the broker check, and the Celery app's configuration.

Commands import this module for its names without loading Celery or reading settings. `sdq
submit` and `sdq reconcile` build their own app with `create_app` to publish; the worker
process builds its own from the same function (`worker.app`). There is no result backend: the
database holds every outcome.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from sdq.core.errors import Unavailable
from sdq.core.jobspec import PRIORITIES
from sdq.core.params import short_hash
from sdq.core.settings import Settings

if TYPE_CHECKING:
    from celery import Celery

TASK_NAME = "sdq.run_batches"
QUEUE_PREFIX = "sdq."
BROKER_TIMEOUT_S = 30
"""Seconds one Redis command of Celery's may wait for its answer before it fails as a lost
connection, which Celery and kombu recover from by connecting again. Without it, a Redis that
stops answering but keeps its connections (paused, failing over, behind a NAT that forgot
them) holds a publish or a worker's acknowledgement for ever."""
BROKER_CONNECT_TIMEOUT_S = 10


def broker_priority(priority: int) -> int:
    """kombu's Redis transport pops level 0 first: the reverse of a job's priority. Values
    outside the range (recorded before it was enforced) count as its nearest end."""
    return PRIORITIES.stop - 1 - min(max(priority, PRIORITIES.start), PRIORITIES.stop - 1)


def level_lists(queue: str) -> list[str]:
    """The Redis lists that hold `queue`'s messages, one per level (level 0 is the bare name).

    kombu names a level's list with its Redis `sep` transport option, which sdq leaves at
    kombu's default. The same separator joins the fields of the binding tables that every
    client reads to route a message, the replies to `celery inspect` and Flower included: a
    worker with another separator cannot parse the binding a default client writes for its
    reply queue, so it answers no control command. Priorities depend on `priority_steps` alone,
    which only sdq's publishers and workers need; a plain client's control messages and their
    replies go at level 0, the bare list, whatever its steps."""
    from kombu.transport.redis import Channel

    return [queue, *(f"{queue}{Channel.sep}{level}" for level in PRIORITIES if level)]


def queue_name(model_sha256: str) -> str:
    """One queue per model, named by its short hash: a worker only receives work it can run."""
    return f"{QUEUE_PREFIX}{short_hash(model_sha256)}"


def check_broker(broker_url: str, timeout: float = 5.0) -> None:
    """Connect to the broker and select its database, or raise Unavailable naming it (password
    masked) and why: refused, unknown host, a database number Redis does not have, no answer
    within `timeout`. Submitting checks this before recording anything, so a broker that is
    down never leaves a job behind."""
    from kombu import Connection
    from kombu.utils.url import sanitize_url

    try:
        with Connection(broker_url, connect_timeout=timeout,
                        transport_options={"socket_timeout": timeout}) as connection:
            connection.ensure_connection(max_retries=0, timeout=timeout)
            connection.default_channel  # noqa: B018 - selects the database: /99 fails here
    except Exception as exc:  # noqa: BLE001 - kombu raises the transport's own errors, of any type
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise Unavailable(f"cannot reach the broker at {sanitize_url(broker_url)}: {detail}; "
                          "nothing was submitted") from None


def create_app(settings: Settings) -> Celery:
    """An app on the settings' broker (an in-memory one in embedded mode, never used there)."""
    from celery import Celery

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
            "socket_timeout": BROKER_TIMEOUT_S,
            "socket_connect_timeout": BROKER_CONNECT_TIMEOUT_S,
        },
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
    )
    return app
