"""Live workers, as `sdq workers` shows them: each pool process writes a small record to the
broker's Redis every few seconds, with a time-to-live, so a dead worker disappears by itself.

This is monitoring only; nothing decides anything from it (leases in the database do that).
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

from sdq.core.settings import Settings

if TYPE_CHECKING:
    from sdq.worker.runner import Runner

log = logging.getLogger(__name__)

INTERVAL_S = 2.0
KEY_PREFIX = "sdq:worker:"


def _redis(broker_url: str):  # type: ignore[no-untyped-def]
    import redis

    return redis.Redis.from_url(broker_url, socket_timeout=5, socket_connect_timeout=5)


class Heartbeat(threading.Thread):
    """Publishes this process's state every `INTERVAL_S`, expiring after three missed beats."""

    def __init__(self, settings: Settings, name: str, runner: Callable[[], "Runner"]) -> None:
        super().__init__(name="sdq-heartbeat", daemon=True)
        assert settings.broker_url, "heartbeats need a broker"
        self.client = _redis(settings.broker_url)
        self.name, self.runner_of, self.model = name, runner, settings.model
        self.hash_cache = settings.home / "hashes.json"
        self.key = f"{KEY_PREFIX}{name}:{os.getpid()}"
        self.queue: str | None = None

    def record(self) -> dict[str, Any]:
        runner = self.runner_of()
        return {
            "name": self.name, "host": socket.gethostname(), "pid": os.getpid(),
            "gpu": os.environ.get("CUDA_VISIBLE_DEVICES") or runner.device or "default",
            "model": Path(self.model).name, "queue": self.queue, "batch": runner.current_batch,
            "images_done": runner.images_done, "images_reused": runner.images_reused,
            "heartbeat": time.time(),
        }

    def _queue(self) -> str | None:
        """The queue this worker serves, from its model's hash (cached by `sdq worker`)."""
        from sdq.jobs.broker import queue_name
        from sdq.jobs.submit import identify_model

        try:
            return queue_name(identify_model(self.model, self.hash_cache).sha256)
        except Exception as exc:  # noqa: BLE001 - monitoring must never stop the worker
            log.warning("heartbeat cannot name its queue: %s", exc)
            return None

    def run(self) -> None:
        self.queue = self._queue()
        while True:
            try:
                self.client.set(self.key, json.dumps(self.record()), ex=int(3 * INTERVAL_S) + 1)
            except Exception as exc:  # noqa: BLE001 - monitoring must never stop the worker
                log.warning("heartbeat failed: %s", exc)
            time.sleep(INTERVAL_S)


def serving(broker_url: str, queues: Iterable[str]) -> set[str]:
    """Which of `queues` some live worker serves (by its heartbeat)."""
    return {r.get("queue") for r in live_workers(broker_url)} & set(queues)


def live_workers(broker_url: str) -> list[dict[str, Any]]:
    """The records of every worker process that beat within the last few seconds, by name."""
    client = _redis(broker_url)
    keys = sorted(client.scan_iter(match=f"{KEY_PREFIX}*", count=1000))
    records = [json.loads(raw) for raw in client.mget(keys) if raw] if keys else []
    return sorted(records, key=lambda r: (r["name"], r["pid"]))
