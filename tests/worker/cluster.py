"""Real worker processes for the distributed tests, and waiting on what they do.

Each worker is `sdq worker` in a session of its own, so a test can kill one pool process or
the whole process group (a machine dying); teardown always kills what is left.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, TypeVar

import redis

T = TypeVar("T")


def wait_for(what: str, probe: Callable[[], T | None], timeout: float = 90.0, every: float = 0.2) -> T:
    """Poll `probe` until it returns something truthy; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


class WorkerProcess:
    """One worker (`command`, node name NAME) on `broker_url`, with its own log file."""

    def __init__(self, command: list[str], env: dict[str, str], broker_url: str, name: str,
                 log: Path) -> None:
        self.name, self.log = name, log
        self.redis = redis.Redis.from_url(broker_url)
        with log.open("wb") as out:
            self.process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT,
                                            start_new_session=True)

    @classmethod
    def sdq(cls, sdq: Path, env: dict[str, str], model: Path, name: str, log: Path) -> "WorkerProcess":
        """`sdq worker --name NAME`, as a deployment starts it."""
        return cls([str(sdq), "worker", "--model", str(model), "--name", name, "--",
                    "--loglevel", "INFO", "--pool", "prefork"], env, env["SDQ_BROKER_URL"], name, log)

    def record(self) -> dict[str, Any] | None:
        """The pool process's latest heartbeat."""
        for key in self.redis.scan_iter(match=f"sdq:worker:{self.name}@*"):
            raw = self.redis.get(key)
            if raw:
                return json.loads(raw)
        return None

    def wait_ready(self) -> None:
        wait_for(f"worker {self.name} to beat (log: {self.log})", self._alive_record, timeout=120)

    def _alive_record(self) -> dict[str, Any] | None:
        if self.process.poll() is not None:
            raise AssertionError(f"worker {self.name} exited: {self.log.read_text()[-3000:]}")
        return self.record()

    def kill_group(self) -> None:
        """Every process of the worker at once, as when its machine dies."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(timeout=30)

    def stop(self) -> None:
        self.kill_group()
        self.redis.close()
