"""Full-length outages against a real distributed run: what the fault-injection tests do in
short, at the lengths of the original report (PostgreSQL and Redis cut 30 s, S3 150 s).

    python -m bench.bench_faults                    # every scenario, tiny model, CPU
    python -m bench.bench_faults --only s3 --cut-s3 150

One `sdq worker` (tiny random-weight model) reaches PostgreSQL, Redis and the moto S3 server
(tests/s3server.py) through loopback TCP proxies (tests/faults.py). For each scenario a job of
--images images is submitted, the service is refused once the first image is done, for the
cut's length, then restored. Printed per scenario: seconds from submit to the job's end,
items done / failed, the highest attempt count, and objects under the job's prefix that no
row points to. Nothing is run by hand between scenarios: what is lost, the workers find.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

import torch
from safetensors.torch import save_file
from sqlalchemy import select
from sqlalchemy.orm import Session

from sdq.db.models import Item, Job, Status
from sdq.db.session import upgrade
from sdq.images.storage import open_storage
from sdq.jobs.submit import identify_model, submit
from sdq.core.settings import Settings
from tests.conftest import build_tiny_networks, ldm_checkpoint
from tests.faults import TcpProxy
from tests.s3server import start_s3_server
from tests.services import claimed_redis_db, scratch_database
from tests.worker.cluster import WorkerProcess, wait_for


def specs(count: int) -> list[dict]:
    return [{"prompt": f"a red boat number {n}", "seed": n, "sampler": "euler", "steps": 2,
             "cfg": 7.5, "width": 64, "height": 64} for n in range(count)]


def items_of(engine, job_id: int) -> list[Item]:  # type: ignore[no-untyped-def]
    with Session(engine) as session:
        return list(session.scalars(select(Item).where(Item.job_id == job_id)))


def run(args: argparse.Namespace) -> None:
    folder = Path(tempfile.mkdtemp(prefix="sdq-bench-faults-"))
    checkpoint = folder / "tiny.safetensors"
    save_file(ldm_checkpoint(*build_tiny_networks()), str(checkpoint))
    s3 = start_s3_server()
    bucket = f"sdq-{uuid.uuid4().hex[:12]}"
    s3.client().create_bucket(Bucket=bucket)
    with claimed_redis_db() as broker, scratch_database("postgresql", folder) as engine:
        upgrade(engine)
        database = engine.url.render_as_string(hide_password=False)
        env = {**{k: v for k, v in os.environ.items() if not k.startswith(("SDQ_", "AWS_"))},
               "SDQ_HOME": str(folder / "home"), "SDQ_CONFIG": str(folder / "none.toml"),
               "SDQ_BROKER_URL": broker, "SDQ_DATABASE_URL": database,
               "SDQ_STORAGE_URL": f"s3://{bucket}/images", "SDQ_DEVICE": "cpu",
               "SDQ_RECONCILE_INTERVAL": "5", "AWS_ENDPOINT_URL": s3.endpoint,
               "AWS_ACCESS_KEY_ID": s3.access_key, "AWS_SECRET_ACCESS_KEY": s3.secret_key,
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
               "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        os.environ.update({k: v for k, v in env.items() if k.startswith("AWS_")})
        settings = Settings.load(env)
        proxies = {"postgresql": TcpProxy(("127.0.0.1", 5432)), "redis": TcpProxy(("127.0.0.1", 6379)),
                   "s3": TcpProxy(("127.0.0.1", int(s3.endpoint.rsplit(":", 1)[1])))}
        worker_env = {**env, "SDQ_DATABASE_URL": proxies["postgresql"].url(database),
                      "SDQ_BROKER_URL": proxies["redis"].url(broker),
                      "AWS_ENDPOINT_URL": proxies["s3"].url(s3.endpoint)}
        sdq = Path(sys.executable).parent / "sdq"
        worker = WorkerProcess.sdq(sdq, worker_env, checkpoint, f"bench-{uuid.uuid4().hex[:6]}",
                                   folder / "worker.log")
        try:
            worker.wait_ready()
            model = identify_model(checkpoint)
            storage = open_storage(settings.storage_url)
            print(f"{'scenario':<22} {'cut s':>6} {'job s':>7} {'done':>5} {'failed':>6} "
                  f"{'max attempts':>12} {'orphans':>7}")
            cuts = {"postgresql": args.cut_postgresql, "redis": args.cut_redis, "s3": args.cut_s3}
            for service, seconds in cuts.items():
                if args.only and service != args.only:
                    continue
                start = time.monotonic()
                job = submit(settings, specs(args.images), model=model, batch_size=2,
                             batches_per_message=1)
                wait_for("a first image", lambda: any(
                    i.status == Status.DONE for i in items_of(engine, job.job_id)), timeout=600)
                proxies[service].cut("refuse")
                time.sleep(seconds)
                proxies[service].restore()

                def finished() -> bool:
                    with Session(engine) as session:
                        return session.get(Job, job.job_id).status in (Status.DONE, Status.FAILED)

                wait_for(f"job {job.job_id}", finished, timeout=3600, every=1)
                items = items_of(engine, job.job_id)
                orphans = set(storage.list(f"{job.job_id}/")) - {i.image_key for i in items}
                print(f"{service + ' refused':<22} {seconds:>6.0f} {time.monotonic() - start:>7.1f} "
                      f"{sum(i.status == Status.DONE for i in items):>5} "
                      f"{sum(i.status == Status.FAILED for i in items):>6} "
                      f"{max(i.attempts for i in items):>12} {len(orphans):>7}", flush=True)
        finally:
            worker.stop()
            for proxy in proxies.values():
                proxy.close()
            s3.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--cut-postgresql", type=float, default=30)
    parser.add_argument("--cut-redis", type=float, default=30)
    parser.add_argument("--cut-s3", type=float, default=150)
    parser.add_argument("--only", choices=["postgresql", "redis", "s3"])
    torch.set_num_threads(max(1, torch.get_num_threads()))
    run(parser.parse_args())


if __name__ == "__main__":
    main()
