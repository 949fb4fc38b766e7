"""A configured sdq home for command tests, and jobs with real rows and real stored images.

Rows go in through `db.queries.submit_job` and images through `encode_png` + the configured
storage, the way the worker records them, so `show` and `get` read what a worker would leave.
"""
from __future__ import annotations

import signal
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from PIL import Image
from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from sdq.cli.main import cli
from sdq.db.models import Item, Job, Status
from sdq.db.queries import register_model, submit_job
from sdq.db.session import open_database, upgrade
from sdq.images.provenance import Provenance, encode_png, environment_fingerprint
from sdq.images.storage import image_key, open_storage
from tests.services import scratch_database

MODEL_SHA = "ab" * 32
T0 = datetime(2025, 6, 1, 12, 0, tzinfo=timezone.utc)


def as_from_a_terminal() -> None:
    """`preexec_fn` for a command a test interrupts as Ctrl-C does: a shell starts background
    jobs (CI's runner, a `cmd &`) with SIGINT ignored, their children inherit that, and a
    Python started so never turns SIGINT into KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@dataclass
class Home:
    """Environment variables of one test's sdq, and a way to run commands with them."""

    env: dict[str, str]
    path: Path

    def run(self, *args: str, input: str | None = None) -> Result:
        return CliRunner().invoke(cli, list(args), env=self.env, input=input)

    @property
    def engine(self) -> Engine:
        return open_database(self.env.get("SDQ_DATABASE_URL")
                             or f"sqlite:///{self.path / 'home' / 'sdq.db'}")

    def add_job(self, prompts: list[str], *, done: int = 0, failed: dict[int, str] | None = None,
                item_tags: list[list[str] | None] | None = None,
                **job_fields: object) -> Job:
        """One item per prompt (seed 100 + row); the first `done` are finished with a stored
        64x64 image, one second apart; `failed` maps rows to their error; `job_fields` (e.g.
        the job's own `tags`) go to the Job."""
        engine = self.engine
        storage = open_storage(self.env.get("SDQ_STORAGE_URL") or str(self.path / "home" / "images"))
        with Session(engine, expire_on_commit=False) as session:
            model = register_model(session, sha256=MODEL_SHA, name="tiny", source_uri="/m/tiny")
            specs = [{"prompt": p, "seed": 100 + n, "sampler": "euler", "steps": 20, "cfg": 7.5,
                      "width": 64, "height": 64, "model_id": model.id,
                      "tags": (item_tags or [None] * len(prompts))[n]} for n, p in enumerate(prompts)]
            job = submit_job(session, Job(**job_fields), specs)
            items = session.scalars(select(Item).where(Item.job_id == job.id)
                                    .order_by(Item.row_index)).all()
            for item in items[:done]:
                provenance = Provenance(
                    params=item.params, model_sha256=MODEL_SHA,
                    model_name="tiny", environment=environment_fingerprint("cpu", "fp32"),
                    job_id=job.id, item_id=item.id, row=item.row_index)
                png = encode_png(Image.new("RGB", (64, 64), (item.row_index * 40 % 256, 90, 30)),
                                 provenance, watermark="StableDiffusionV1")
                key = image_key(job.id, item.id)
                storage.put(key, png.data)
                item.status, item.image_key, item.image_sha256 = Status.DONE, key, png.sha256
                item.started_at = T0 + timedelta(seconds=item.row_index)
                item.finished_at = T0 + timedelta(seconds=item.row_index + 1)
                item.device = "cpu"
            for row, error in (failed or {}).items():
                items[row].status, items[row].last_error = Status.FAILED, error
            session.commit()
        engine.dispose()
        return job


    def judge(self, job_id: int, flagged: dict[int, bool], action: str = "kept") -> None:
        """Record safety verdicts on rows of the job as the runner does: flagged or not by row,
        `action` for the flagged ones; other rows stay unchecked."""
        with Session(self.engine) as session:
            items = session.scalars(select(Item).where(Item.job_id == job_id)).all()
            for item in items:
                if item.row_index in flagged:
                    hit = flagged[item.row_index]
                    item.safety_flagged, item.safety_action = hit, action if hit else "kept"
                    item.safety_checker_sha256 = "cd" * 32
                    item.safety_scores = {"concept": [0.012 if hit else -0.2] + [-0.1] * 16,
                                          "special": [-0.05] * 3}
            session.commit()


@pytest.fixture
def home(tmp_path: Path) -> Home:
    """The embedded default: SQLite and a local image folder under SDQ_HOME."""
    return Home({"SDQ_HOME": str(tmp_path / "home"), "SDQ_CONFIG": str(tmp_path / "none.toml")},
                tmp_path)


@pytest.fixture(params=["sqlite", "postgresql"])
def any_home(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Home]:
    """The embedded default, or the same with the real PostgreSQL server as the database."""
    env = {"SDQ_HOME": str(tmp_path / "home"), "SDQ_CONFIG": str(tmp_path / "none.toml")}
    if request.param == "sqlite":
        yield Home(env, tmp_path)
        return
    with scratch_database("postgresql", tmp_path) as engine:
        upgrade(engine)
        env["SDQ_DATABASE_URL"] = engine.url.render_as_string(hide_password=False)
        yield Home(env, tmp_path)
