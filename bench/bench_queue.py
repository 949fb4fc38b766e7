"""Benchmark the queue: what the full system adds to the model's own time, and the enqueue rate.

    python -m bench.bench_queue                                # full-size SD v1 (random), CPU
    python -m bench.bench_queue --model v1-5.safetensors --images 32 --size 512 --device cuda
    python -m bench.bench_queue --skip-overhead --items 100000  # enqueue rate only

Overhead: N images go through the whole system (submit → Redis → `sdq worker` → storage →
PostgreSQL), timed from the start of `submit` to the job's last row turning `done`, after a
warm-up job has loaded the model in the worker. They are compared with the pure model time:
the same images in the same batch compositions through `Pipeline.generate` in this process.
Because a shared machine's speed drifts, the worker's own generation time (the items'
`duration_s`, summed) is reported too, and the overhead relative to it.

Enqueue: `submit` of one job of --items items for a model no worker serves (PostgreSQL COPY,
batch planning, one message per 4 batches of 8), then the queue is deleted.

Needs Redis and PostgreSQL (defaults: the local CI services); images go to a temporary folder
unless --storage is given. PostgreSQL runs in a schema of its own, dropped afterwards.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import redis
import torch
from safetensors.torch import save_file
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from sdq.db.models import Item, Status
from sdq.db.session import engine_from_url, upgrade
from sdq.sdmodel.pipeline import Request, load_pipeline
from sdq.jobs.broker import level_lists
from sdq.jobs.submit import ModelIdentity, identify_model, submit
from sdq.core.settings import Settings
from tests.conftest import full_size_networks_fp16, ldm_checkpoint
from tests.services import scratch_database


def full_size_checkpoint(path: Path) -> Path:
    """SD v1.5's architecture with random fp16 weights (2.1 GB): real speed, no download."""
    save_file(ldm_checkpoint(*full_size_networks_fp16(seed=0)), str(path))
    return path


def specs(count: int, steps: int, size: int) -> list[dict]:
    return [{"prompt": f"a lighthouse at dusk, painting number {n}", "seed": n, "cfg": 7.5,
             "sampler": "euler", "steps": steps, "width": size, "height": size}
            for n in range(count)]


@contextmanager
def schema(postgresql_url: str) -> Iterator[str]:
    """A migrated scratch schema on the server, as a URL for the worker processes."""
    with tempfile.TemporaryDirectory(prefix="sdq-bench-") as folder:
        with scratch_database("postgresql", Path(folder), postgresql_url) as engine:
            upgrade(engine)
            yield engine.url.render_as_string(hide_password=False)


def wait_done(database_url: str, job_id: int, timeout: float) -> float:
    """Seconds until every item of the job is done; polls every 20 ms."""
    engine = engine_from_url(database_url)
    deadline = time.monotonic() + timeout
    with Session(engine) as session:
        while time.monotonic() < deadline:
            open_items = session.scalar(select(func.count()).where(
                Item.job_id == job_id, Item.status != Status.DONE))
            session.rollback()
            if open_items == 0:
                engine.dispose()
                return time.perf_counter()
            time.sleep(0.02)
    raise TimeoutError(f"job {job_id} not done after {timeout:.0f} s")


def pure_model_seconds(model: Path, args: argparse.Namespace) -> float:
    """The same images in the same batch compositions, model only (after a warm-up)."""
    pipe = load_pipeline(model, device=args.device, dtype=args.dtype)
    settings = dict(sampler="euler", steps=args.steps, width=args.size, height=args.size)
    pipe.generate([Request("warm-up")], **{**settings, "steps": 1})
    requests = [Request(s["prompt"], "", s["seed"], s["cfg"]) for s in specs(args.images, args.steps, args.size)]
    start = time.perf_counter()
    for i in range(0, len(requests), args.batch_size):
        pipe.generate(requests[i:i + args.batch_size], **settings)
    if args.device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def overhead(model: Path, env: dict[str, str], args: argparse.Namespace) -> None:
    pure = pure_model_seconds(model, args)
    settings = Settings.load(env)
    identity = identify_model(model)
    log = open(Path(env["SDQ_HOME"]) / "worker.log", "wb")
    worker = subprocess.Popen([str(Path(sys.executable).parent / "sdq"), "worker", "--model", str(model)],
                              env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        warm = submit(settings, specs(1, 1, args.size), model=identity)
        wait_done(settings.database_url, warm.job_id, timeout=1800)
        start = time.perf_counter()
        job = submit(settings, specs(args.images, args.steps, args.size), model=identity,
                     batch_size=args.batch_size)
        wall = wait_done(settings.database_url, job.job_id, timeout=3600) - start
    finally:
        os.killpg(worker.pid, 9)
        worker.wait()
        log.close()
    engine = engine_from_url(settings.database_url)
    with Session(engine) as session:
        in_worker = session.scalar(select(func.sum(Item.duration_s)).where(Item.job_id == job.job_id))
    engine.dispose()
    print(f"\n{args.images} images, {args.size}x{args.size}, {args.steps} steps, batch {args.batch_size}, "
          f"{args.device} {args.dtype}\n")
    print("| measure | seconds | overhead vs it |")
    print("|---|---:|---:|")
    print(f"| end to end (submit → done) | {wall:.2f} | |")
    print(f"| pure model, this process | {pure:.2f} | {100 * (wall - pure) / pure:+.1f}% |")
    print(f"| generation inside the worker | {in_worker:.2f} | {100 * (wall - in_worker) / in_worker:+.1f}% |")


def enqueue_rate(env: dict[str, str], items: int) -> None:
    settings = Settings.load(env)
    nobody = ModelIdentity("bench", uuid.uuid4().hex * 2, "bench-no-worker")
    start = time.perf_counter()
    result = submit(settings, specs(items, 20, 512), model=nobody)
    seconds = time.perf_counter() - start
    client = redis.Redis.from_url(settings.broker_url or "")
    lists = level_lists(result.queue or "")  # default priority 0 is not the bare list
    messages = sum(client.llen(name) for name in lists)
    client.delete(*lists)
    print(f"\nenqueue: {items:,} items, {result.batches:,} batches, {messages:,} messages in "
          f"{seconds:.1f} s: {items / seconds:,.0f} items/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="checkpoint [default: a random full-size SD v1]")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--items", type=int, default=100_000, help="items for the enqueue rate")
    parser.add_argument("--skip-overhead", action="store_true")
    parser.add_argument("--broker", default="redis://127.0.0.1:6379/13")
    parser.add_argument("--postgresql-url", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--storage", help="storage URL [default: a temporary folder]")
    args = parser.parse_args()
    args.dtype = args.dtype or ("fp32" if args.device == "cpu" else "fp16")
    with tempfile.TemporaryDirectory() as tmp, schema(args.postgresql_url) as database_url:
        env = {**os.environ, "SDQ_HOME": tmp, "SDQ_CONFIG": f"{tmp}/none.toml",
               "SDQ_BROKER_URL": args.broker, "SDQ_DATABASE_URL": database_url,
               "SDQ_STORAGE_URL": args.storage or f"{tmp}/images", "SDQ_DEVICE": args.device,
               "SDQ_DTYPE": args.dtype}
        if not args.skip_overhead:
            overhead(args.model or full_size_checkpoint(Path(tmp) / "sd-v1-random.safetensors"), env, args)
        enqueue_rate(env, args.items)


if __name__ == "__main__":
    main()
