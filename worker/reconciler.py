"""Each worker process reconciles by itself, so that work lost on the way (a worker killed,
Redis flushed, a submit whose broker failed after recording, items handed back after an
outage) is taken up again without anyone running `sdq reconcile`.

A thread, like the heartbeat, that runs `lifecycle.sweep` every SDQ_RECONCILE_INTERVAL
seconds; the sweep's conditional updates make any number of them safe at once.
"""
from __future__ import annotations

import logging
import threading

from sdq.core.settings import Settings
from sdq.jobs.broker import level_lists, queue_name

log = logging.getLogger(__name__)


class Reconciler(threading.Thread):
    """Sweeps every `settings.reconcile_interval` seconds; items are taken again once they
    have waited `grace_s` (a lease's length: a live holder renews within it)."""

    def __init__(self, settings: Settings, grace_s: float) -> None:
        super().__init__(name="sdq-reconcile", daemon=True)
        assert settings.broker_url, "a reconciler re-enqueues on a broker"
        self.settings, self.grace_s = settings, grace_s
        self.stopped = threading.Event()

    def waiting(self, model_sha256: str) -> int:
        """Messages waiting in the model's queue, at every priority level."""
        import redis

        client = redis.Redis.from_url(self.settings.broker_url or "", socket_timeout=5,
                                      socket_connect_timeout=5)
        try:
            return sum(int(client.llen(name)) for name in level_lists(queue_name(model_sha256)))
        finally:
            client.close()

    def run(self) -> None:
        from sdq.db.session import open_database
        from sdq.jobs.lifecycle import sweep

        engine = None
        while not self.stopped.wait(self.settings.reconcile_interval):
            try:
                engine = engine or open_database(self.settings.database_url)
                done = sweep(self.settings, engine, grace_s=self.grace_s, waiting=self.waiting)
            except Exception as exc:  # noqa: BLE001 - a service down: the next sweep tries again
                log.warning("reconcile failed, trying again in %ds: %s",
                            self.settings.reconcile_interval, exc)
                continue
            if done.items:
                log.warning("reconcile: %d item(s) re-enqueued in %d batch(es)", done.items,
                            done.batches)
