"""The tools sdq's users already run against a Celery deployment: a plain Celery client (as in
`celery inspect`), the `celery -A sdq.worker.app` command line, and Flower. None of them knows
sdq's transport options, and each must still see sdq's workers."""
from __future__ import annotations

import base64
import json
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from celery import Celery

from sdq.jobs.broker import queue_name
from sdq.jobs.submit import identify_model

from .cluster import WorkerProcess, wait_for

CELERY = [sys.executable, "-m", "celery"]


def plain_app(broker_url: str) -> Celery:
    """A Celery client configured as Flower or `celery -b URL` is: the broker and nothing else."""
    return Celery("plain", broker=broker_url, set_as_current=False)


def node_name(worker: WorkerProcess) -> str:
    return f"{worker.name}@{socket.gethostname()}"


def replies(app: Celery, method: str) -> dict[str, Any]:
    return getattr(app.control.inspect(timeout=2), method)() or {}


def test_a_plain_celery_client_pings_and_lists_the_queues_of_sdq_workers(
        distributed_env: dict[str, str], start_worker: Callable[[str], WorkerProcess],
        tiny_checkpoint: Path) -> None:
    worker = start_worker("plain")
    worker.wait_ready()
    app = plain_app(distributed_env["SDQ_BROKER_URL"])
    try:
        pongs = wait_for("the worker to answer a plain ping", lambda: replies(app, "ping"))
        assert pongs == {node_name(worker): {"ok": "pong"}}
        [queues] = replies(app, "active_queues").values()
        assert [q["name"] for q in queues] == [queue_name(identify_model(tiny_checkpoint).sha256)]
    finally:
        app.close()
    assert "Control command error" not in worker.log.read_text()


def test_celery_b_is_the_broker_of_the_whole_worker(
        distributed_env: dict[str, str], tiny_checkpoint: Path, tmp_path: Path) -> None:
    """`celery -A sdq.worker.app -b URL worker` with no SDQ_BROKER_URL: tasks and heartbeats
    use URL too, and `celery -b URL inspect ping` reaches the worker."""
    broker = distributed_env["SDQ_BROKER_URL"]
    env = {k: v for k, v in distributed_env.items() if k != "SDQ_BROKER_URL"}
    env["SDQ_MODEL"] = str(tiny_checkpoint)
    name = "celery-b"
    queue = queue_name(identify_model(tiny_checkpoint).sha256)
    worker = WorkerProcess([*CELERY, "-A", "sdq.worker.app", "-b", broker, "worker", "-Q", queue,
                            "-n", f"{name}@%h", "--concurrency", "1", "--pool", "prefork"],
                           env, broker, name, tmp_path / "celery-b.log")
    try:
        worker.wait_ready()

        def ping() -> str | None:
            done = subprocess.run([*CELERY, "-A", "sdq.worker.app", "-b", broker,
                                   "inspect", "ping", "--timeout", "2"],
                                  env=env, capture_output=True, text=True, timeout=120)
            return done.stdout if done.returncode == 0 else None

        out = wait_for("`celery -b URL inspect ping` to succeed", ping)
        assert node_name(worker) in out and "1 node online." in out
    finally:
        worker.stop()


def test_celery_b_and_another_sdq_broker_url_are_refused_in_one_line(
        distributed_env: dict[str, str]) -> None:
    env = {**distributed_env, "SDQ_BROKER_URL": "redis://:secret@127.0.0.1:6379/3"}
    done = subprocess.run([*CELERY, "-A", "sdq.worker.app", "-b", "redis://127.0.0.1:6379/4",
                           "inspect", "ping", "--timeout", "1"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert done.stderr.strip().splitlines() == [
        "sdq: the broker given to celery (-b or CELERY_BROKER_URL: redis://127.0.0.1:6379/4) is not "
        "SDQ_BROKER_URL (redis://:***@127.0.0.1:6379/3); give one of them, or the same URL to both"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


FLOWER_USER, FLOWER_PASSWORD = "sdq", "flower-test-secret"


@pytest.fixture
def flower(distributed_env: dict[str, str], tmp_path: Path) -> Iterator[Callable[[], str]]:
    """Start Flower on the test broker, on loopback and a free port, with basic auth as the
    compose file sets it (FLOWER_BASIC_AUTH); the call gives its base URL."""
    pytest.importorskip("flower")
    started: list[subprocess.Popen[bytes]] = []

    def start() -> str:
        port = free_port()
        with (tmp_path / "flower.log").open("wb") as log:
            started.append(subprocess.Popen(
                [*CELERY, f"--broker={distributed_env['SDQ_BROKER_URL']}", "flower",
                 "--address=127.0.0.1", f"--port={port}"],
                env={**distributed_env, "FLOWER_BASIC_AUTH": f"{FLOWER_USER}:{FLOWER_PASSWORD}"},
                stdout=log, stderr=subprocess.STDOUT))
        return f"http://127.0.0.1:{port}"

    try:
        yield start
    finally:
        for process in started:
            process.kill()
            process.wait(timeout=30)


def get(url: str, *, auth: bool = True) -> tuple[int, Any] | None:
    """(HTTP status, JSON body or None), or None while nothing answers."""
    request = urllib.request.Request(url)
    if auth:
        token = base64.b64encode(f"{FLOWER_USER}:{FLOWER_PASSWORD}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as exc:
        return exc.code, None
    except (urllib.error.URLError, ConnectionError):
        return None


def test_flower_lists_sdq_workers_to_its_users_only(
        start_worker: Callable[[str], WorkerProcess], flower: Callable[[], str]) -> None:
    worker = start_worker("flowered")
    worker.wait_ready()
    base = flower()

    def listed() -> dict[str, Any] | None:
        answer = get(f"{base}/api/workers?refresh=1")
        return answer[1] if answer and answer[0] == 200 and node_name(worker) in answer[1] else None

    workers = wait_for("Flower to list the worker", listed, timeout=120, every=1)
    assert workers[node_name(worker)]["active_queues"]
    assert get(f"{base}/api/workers", auth=False) == (401, None)
    assert "Control command error" not in worker.log.read_text()
