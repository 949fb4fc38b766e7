"""Distributed mode end to end: `submit` → Redis → `sdq worker` processes → S3 + PostgreSQL."""
from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path
from typing import Callable

import pytest
import redis
from click.testing import CliRunner
from PIL import Image
from sqlalchemy import update
from sqlalchemy.orm import Session

from sdq.cli.main import cli
from sdq.db.models import Item, Job, Status
from sdq.db.session import open_database
from sdq.jobs.broker import queue_name
from sdq.images.storage import open_storage
from sdq.jobs.submit import identify_model, submit
from sdq.core.settings import Settings
from sdq.worker.factory import runner_from_settings
from tests.services import OWNER_KEY, clear_queues, in_queue, scratch_database

from .cluster import WorkerProcess, wait_for
from .conftest import job_items, specs


def wait_until_done(settings: Settings, job_id: int, timeout: float = 120) -> None:
    engine = open_database(settings.database_url)

    def finished() -> bool:
        with Session(engine) as session:
            return session.get(Job, job_id).status in (Status.DONE, Status.FAILED)

    wait_for(f"job {job_id} to finish", finished, timeout=timeout, every=0.5)
    engine.dispose()


def assert_exactly_once(settings: Settings, job_id: int, count: int) -> None:
    """Every item done once: one object per item under its own key, and nothing else."""
    items = job_items(open_database(settings.database_url), job_id)
    assert len(items) == count and {i.status for i in items} == {Status.DONE}
    keys = sorted(open_storage(settings.storage_url).list(f"{job_id}/"))
    assert keys == sorted(i.image_key for i in items)


def test_two_workers_share_one_job(distributed: Settings, distributed_env: dict[str, str],
                                   start_worker: Callable[[str], WorkerProcess],
                                   tiny_checkpoint: Path) -> None:
    workers = [start_worker("a"), start_worker("b")]
    for w in workers:
        w.wait_ready()
    model = identify_model(tiny_checkpoint)
    result = submit(distributed, specs(12, steps=1), model=model, batch_size=2,
                    batches_per_message=1)
    assert (result.batches, result.queue, result.report) == (6, queue_name(model.sha256), None)
    wait_until_done(distributed, result.job_id)
    assert_exactly_once(distributed, result.job_id, 12)
    items = job_items(open_database(distributed.database_url), result.job_id)
    per_worker = Counter(i.worker_host.split("@")[0] for i in items)
    assert set(per_worker) == {w.name for w in workers}, per_worker
    assert {i.attempts for i in items} == {1}

    def beats_caught_up() -> bool:  # heartbeats are published every few seconds
        return {w.name: (w.record() or {}).get("images_done") for w in workers} == dict(per_worker)

    wait_for("the heartbeats to count every image", beats_caught_up, timeout=30)
    listed = CliRunner().invoke(cli, ["workers", "--json"], env=distributed_env)
    assert listed.exit_code == 0, listed.output
    assert {w.name for w in workers} <= {r["name"].split("@")[0] for r in json.loads(listed.output)}
    assert {r["queue"] for r in json.loads(listed.output)} == {result.queue}  # for submit --wait
    assert in_queue(distributed.broker_url or "", result.queue or "") == 0


def test_redis_flushed_mid_job_then_reconcile_finishes_it(
        distributed: Settings, distributed_env: dict[str, str],
        start_worker: Callable[[str], WorkerProcess], tiny_checkpoint: Path) -> None:
    worker = start_worker("solo")
    worker.wait_ready()
    result = submit(distributed, specs(8, steps=1), model=identify_model(tiny_checkpoint),
                    batch_size=1, batches_per_message=1)
    engine = open_database(distributed.database_url)
    wait_for("the first item to be done",
             lambda: any(i.status == Status.DONE for i in job_items(engine, result.job_id)))
    broker = redis.Redis.from_url(distributed.broker_url or "")
    broker.flushdb()
    broker.set(OWNER_KEY, "flushed by the test", ex=3600)
    assert in_queue(distributed.broker_url or "", result.queue or "") == 0
    # What was running finishes; nothing else comes: the job stalls with items queued.
    wait_for("the worker to go idle", lambda: (r := worker.record()) and r["batch"] is None)
    stalled = [i for i in job_items(engine, result.job_id) if i.status != Status.DONE]
    assert stalled and {i.status for i in stalled} == {Status.QUEUED}

    outcome = CliRunner().invoke(cli, ["reconcile", "--json"], env=distributed_env)
    assert outcome.exit_code == 0, outcome.output
    assert json.loads(outcome.output)["items"] == len(stalled)
    wait_until_done(distributed, result.job_id)
    assert_exactly_once(distributed, result.job_id, 8)
    assert {i.attempts for i in job_items(engine, result.job_id)} == {1}


def test_embedded_and_distributed_make_identical_pixels(
        distributed: Settings, embedded: Settings, start_worker: Callable[[str], WorkerProcess],
        tiny_checkpoint: Path) -> None:
    worker = start_worker("pixels")
    model = identify_model(tiny_checkpoint)
    local = submit(embedded, specs(4), model=model, batch_size=2, make_runner=runner_from_settings)
    worker.wait_ready()
    remote = submit(distributed, specs(4), model=model, batch_size=2)
    wait_until_done(distributed, remote.job_id)
    pairs = zip(job_items(open_database(embedded.database_url), local.job_id),
                job_items(open_database(distributed.database_url), remote.job_id))
    here, there = open_storage(embedded.storage_url), open_storage(distributed.storage_url)
    for a, b in pairs:
        assert (a.batch_position, a.seed) == (b.batch_position, b.seed)
        png_a, png_b = here.get(a.image_key), there.get(b.image_key)
        assert png_a != png_b  # the metadata differs (ids, times) ...
        assert Image.open(io.BytesIO(png_a)).tobytes() == Image.open(io.BytesIO(png_b)).tobytes()


def test_cancel_stops_queued_work(distributed: Settings, distributed_env: dict[str, str],
                                  tiny_checkpoint: Path) -> None:
    result = submit(distributed, specs(3), model=identify_model(tiny_checkpoint))
    outcome = CliRunner().invoke(cli, ["cancel", str(result.job_id), "--json"], env=distributed_env)
    assert outcome.exit_code == 0, outcome.output
    assert json.loads(outcome.output) == {"job": result.job_id, "cancelled": 3}
    engine = open_database(distributed.database_url)
    assert {i.status for i in job_items(engine, result.job_id)} == {Status.CANCELLED}
    with Session(engine) as session:
        assert session.get(Job, result.job_id).status == Status.CANCELLED
    missing = CliRunner().invoke(cli, ["cancel", "999999"], env=distributed_env)
    assert (missing.exit_code, missing.output) == (3, "Error: no job 999999\n")  # not found


def test_retry_reenqueues_failed_items(distributed: Settings, distributed_env: dict[str, str],
                                       tiny_checkpoint: Path) -> None:
    result = submit(distributed, specs(3), model=identify_model(tiny_checkpoint))
    clear_queues(distributed.broker_url or "", result.queue or "")
    engine = open_database(distributed.database_url)
    with Session(engine) as session, session.begin():
        session.execute(update(Item).where(Item.job_id == result.job_id, Item.row_index > 0)
                        .values(status=Status.FAILED, attempts=3, last_error="boom"))
    outcome = CliRunner().invoke(cli, ["retry", str(result.job_id), "--json"], env=distributed_env)
    assert outcome.exit_code == 0, outcome.output
    assert json.loads(outcome.output) == {"job": result.job_id, "items": 2, "batches": 1}
    assert in_queue(distributed.broker_url or "", result.queue or "") == 1
    items = job_items(engine, result.job_id)
    assert [(i.status, i.attempts, i.last_error) for i in items[1:]] == [(Status.QUEUED, 0, None)] * 2


def test_worker_refuses_a_queue_of_another_model(distributed_env: dict[str, str],
                                                 tiny_checkpoint: Path) -> None:
    outcome = CliRunner().invoke(
        cli, ["worker", "--model", str(tiny_checkpoint), "--", "-Q", "sdq.0123456789"],
        env=distributed_env)
    assert outcome.exit_code == 1
    assert outcome.output.startswith("Error: refusing queue 'sdq.0123456789': tiny-sd hashes to ")


def test_worker_takes_a_registered_model_name(distributed_env: dict[str, str],
                                             tiny_checkpoint: Path) -> None:
    """`--model NAME` serves the queue of the model registered as NAME (here refused for the
    wrong queue, so that no worker process starts)."""
    added = CliRunner().invoke(cli, ["models", "add", "tinyd", str(tiny_checkpoint)],
                               env=distributed_env)
    assert added.exit_code == 0, added.output
    outcome = CliRunner().invoke(
        cli, ["worker", "--model", "tinyd", "--", "-Q", "sdq.0123456789"], env=distributed_env)
    assert outcome.exit_code == 1
    assert outcome.output.startswith("Error: refusing queue 'sdq.0123456789': tinyd hashes to ")


def test_worker_refuses_a_database_at_another_schema_revision(
        distributed_env: dict[str, str], tiny_checkpoint: Path, tmp_path: Path) -> None:
    with scratch_database("postgresql", tmp_path) as empty:
        env = {**distributed_env, "SDQ_DATABASE_URL": empty.url.render_as_string(hide_password=False)}
        outcome = CliRunner().invoke(cli, ["worker", "--model", str(tiny_checkpoint)], env=env)
    assert outcome.exit_code == 4  # unavailable
    assert "is at schema revision none, sdq needs" in outcome.output
    assert outcome.output.rstrip().endswith("run `sdq db upgrade`")


def test_worker_refuses_to_start_without_a_reachable_broker(
        distributed_env: dict[str, str], tiny_checkpoint: Path) -> None:
    env = {**distributed_env, "SDQ_BROKER_URL": "redis://127.0.0.1:1/0"}
    outcome = CliRunner().invoke(cli, ["worker", "--model", str(tiny_checkpoint)], env=env)
    assert outcome.exit_code == 4  # unavailable
    assert outcome.output.startswith("Error: cannot reach the broker at 127.0.0.1:1: ")


def test_an_idle_worker_takes_the_higher_priority_job_first(
        distributed: Settings, start_worker: Callable[[str], WorkerProcess], tiny_checkpoint: Path) -> None:
    model = identify_model(tiny_checkpoint)
    before = in_queue(distributed.broker_url or "", queue_name(model.sha256))  # earlier tests' leftovers
    low = submit(distributed, specs(3, steps=1), model=model, batch_size=1, batches_per_message=1)
    high = submit(distributed, specs(2, steps=1), model=model, job=Job(priority=7), batch_size=1,
                  batches_per_message=1)
    assert in_queue(distributed.broker_url or "", low.queue or "") == before + 5
    start_worker("solo").wait_ready()
    wait_until_done(distributed, low.job_id)
    wait_until_done(distributed, high.job_id)
    engine = open_database(distributed.database_url)
    high_started = [i.started_at for i in job_items(engine, high.job_id)]
    low_started = [i.started_at for i in job_items(engine, low.job_id)]
    assert max(high_started) < min(low_started), (high_started, low_started)


def test_a_priority_outside_0_to_9_is_refused_before_anything_is_recorded(
        distributed: Settings, tiny_checkpoint: Path) -> None:
    engine = open_database(distributed.database_url)
    with Session(engine) as session:
        jobs_before = session.query(Job).count()
    with pytest.raises(ValueError, match="priority must be 0-9, got 10"):
        submit(distributed, specs(1), model=identify_model(tiny_checkpoint), job=Job(priority=10))
    with Session(engine) as session:
        assert session.query(Job).count() == jobs_before


def test_wait_says_when_no_live_worker_serves_the_queue_and_waits_on(
        distributed_env: dict[str, str], tiny_checkpoint: Path, tmp_path: Path) -> None:
    import subprocess
    import sys
    import time

    prompts = tmp_path / "p.txt"
    prompts.write_text("a boat\n")
    queue = queue_name(identify_model(tiny_checkpoint).sha256)
    sdq = Path(sys.executable).parent / "sdq"
    process = subprocess.Popen(
        [str(sdq), "submit", str(prompts), "--model", str(tiny_checkpoint), "--width", "64",
         "--height", "64", "--steps", "1", "--wait"],
        env=distributed_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stderr is not None
        deadline, seen = time.monotonic() + 300, ""
        while "no live worker" not in seen and time.monotonic() < deadline:
            seen += process.stderr.readline()
        assert f"no live worker serves {queue}; waiting" in seen, seen
        time.sleep(2)
        assert process.poll() is None  # still waiting
    finally:
        process.kill()
        process.wait(timeout=60)
