"""Fixtures for the queue tests: settings for each mode, item specs, and helpers to look at
what a run left in the database and in storage."""
from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import torch
from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from sdq.core.batch import Batch
from sdq.core.settings import Settings
from sdq.db.models import Item, Job
from sdq.db.queries import register_model, submit_job
from sdq.db.session import open_database, upgrade
from sdq.images.storage import LocalStorage
from sdq.jobs.submit import plan_batches
from tests.s3server import S3Server
from tests.services import scratch_database

from .cluster import WorkerProcess


def specs(count: int, *, steps: int = 2, size: int = 64, **fields: Any) -> list[dict[str, Any]]:
    """`count` small items with distinct prompts, seeds and guidance."""
    return [{"prompt": f"a red boat number {n}", "seed": 1000 + n, "sampler": "euler",
             "steps": steps, "cfg": 7.5 if n % 2 else 5.0, "width": size, "height": size, **fields}
            for n in range(count)]


def queued_job(engine: Engine, sha256: str, items: list[dict[str, Any]], batch_size: int, *,
               job: Job | None = None, prefix: str = "q") -> tuple[int, list[Batch]]:
    """A job of `items` for the model `sha256`, recorded and planned into batches of
    `batch_size`, not yet run: what a runner receives."""
    with Session(engine) as session:
        model = register_model(session, sha256=sha256, name=f"m{sha256[:8]}", source_uri="")
        session.flush()
        recorded = submit_job(session, job or Job(), [{**s, "model_id": model.id} for s in items])
        session.commit()
        return recorded.id, plan_batches(session, Item.job_id == recorded.id, batch_size,
                                         prefix=prefix)[sha256]


def job_items(engine: Engine, job_id: int) -> list[Item]:
    with Session(engine) as session:
        return list(session.scalars(select(Item).where(Item.job_id == job_id).order_by(Item.row_index)))


@pytest.fixture
def embedded_env(tmp_path: Path) -> dict[str, str]:
    """Embedded mode: no broker, SQLite and an image folder under a fresh home."""
    return {"SDQ_HOME": str(tmp_path / "home"), "SDQ_CONFIG": str(tmp_path / "none.toml"),
            "SDQ_DEVICE": "cpu"}


@pytest.fixture
def embedded(embedded_env: dict[str, str]) -> Settings:
    return Settings.load(embedded_env)


@pytest.fixture
def engine(embedded: Settings) -> Engine:
    """The embedded home's index, for the runner parts' tests that drive it directly."""
    return open_database(embedded.database_url)


@pytest.fixture
def storage(embedded: Settings) -> LocalStorage:
    """The embedded home's image folder."""
    return LocalStorage(Path(embedded.storage_url))


# -- distributed mode: real Redis, PostgreSQL, S3 endpoint and worker processes -------------

VISIBILITY_TIMEOUT_S = 6
"""Short, so that a dead worker's message returns within the test's patience."""


@pytest.fixture(scope="session")
def pg_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A PostgreSQL schema of its own, at the newest revision."""
    with scratch_database("postgresql", tmp_path_factory.mktemp("pg")) as engine:
        upgrade(engine)
        yield engine.url.render_as_string(hide_password=False)


@pytest.fixture
def distributed_env(redis_db: str, pg_url: str, s3_server: S3Server, tmp_path: Path) -> dict[str, str]:
    """The environment of a distributed deployment: for the test's own calls (Settings.load)
    and for the worker processes it starts. Each test gets a fresh bucket."""
    bucket = f"sdq-{uuid.uuid4().hex[:12]}"
    s3_server.client().create_bucket(Bucket=bucket)
    env = {name: value for name, value in os.environ.items()
           if not name.startswith(("SDQ_", "AWS_"))}
    env.update({
        "SDQ_HOME": str(tmp_path / "home"), "SDQ_CONFIG": str(tmp_path / "none.toml"),
        "SDQ_BROKER_URL": redis_db, "SDQ_DATABASE_URL": pg_url,
        "SDQ_STORAGE_URL": f"s3://{bucket}/images", "SDQ_DEVICE": "cpu",
        "SDQ_VISIBILITY_TIMEOUT": str(VISIBILITY_TIMEOUT_S), "SDQ_MAX_ATTEMPTS": "3",
        "AWS_ENDPOINT_URL": s3_server.endpoint, "AWS_ACCESS_KEY_ID": s3_server.access_key,
        "AWS_SECRET_ACCESS_KEY": s3_server.secret_key, "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": str(tmp_path / "aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "aws-credentials"),
        "AWS_EC2_METADATA_DISABLED": "true",
        # CPU kernels split work by thread count, and float sums depend on the split: workers
        # use this process's count so that their pixels can be compared with in-process ones.
        "OMP_NUM_THREADS": str(torch.get_num_threads()),
        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
    })
    return env


@pytest.fixture
def distributed(distributed_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Settings of the distributed deployment; the test process's environment gets the AWS
    variables too, so that its own storage reads reach the test endpoint."""
    for name, value in distributed_env.items():
        if name.startswith("AWS_"):
            monkeypatch.setenv(name, value)
    return Settings.load(distributed_env)


@pytest.fixture
def start_worker(distributed_env: dict[str, str], tiny_checkpoint: Path, tmp_path: Path
                 ) -> Iterator[Callable[[str], WorkerProcess]]:
    """Start `sdq worker` processes by name; all are killed when the test ends."""
    sdq = Path(sys.executable).parent / "sdq"
    started: list[WorkerProcess] = []

    def start(name: str) -> WorkerProcess:
        name = f"{name}-{uuid.uuid4().hex[:6]}"
        process = WorkerProcess.sdq(sdq, distributed_env, tiny_checkpoint, name, tmp_path / f"{name}.log")
        started.append(process)
        return process

    try:
        yield start
    finally:
        for process in started:
            process.stop()
