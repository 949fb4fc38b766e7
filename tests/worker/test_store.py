"""The store path of the batch runner: PNG level and store threads from the settings, uploads
outside the row lock with exactly-once results, and a bounded queue of finished chunks."""
from __future__ import annotations

import hashlib
import io
import threading
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from sqlalchemy import update
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from sdq.db.base import utcnow
from sdq.db.models import Item, Job, Status
from sdq.db.session import open_database
from sdq.sdmodel.pipeline import Pipeline, load_pipeline
from sdq.images.storage import LocalStorage, Storage, open_storage
from sdq.jobs.submit import identify_model, submit
from sdq.worker.factory import runner_from_settings
from sdq.worker.outage import TransientError
from sdq.worker.runner import Runner
from sdq.worker.store_queue import QUEUED_CHUNKS
from sdq.core.settings import Settings, default_store_threads
from tests.s3server import FlakyProxy, S3Server

from .conftest import job_items, queued_job, specs


@pytest.fixture(scope="module")
def tiny_pipeline(tiny_checkpoint: Path) -> Pipeline:
    return load_pipeline(tiny_checkpoint, device="cpu")


def assert_exactly_once(engine: Engine, storage: Storage, job_id: int, attempts: int) -> None:
    """Every item done, its object the only one under its id, with the recorded sha256."""
    items = job_items(engine, job_id)
    assert {(i.status, i.attempts) for i in items} == {(Status.DONE, attempts)}
    assert sorted(storage.list(f"{job_id}/")) == sorted(i.image_key for i in items)
    for item in items:
        assert hashlib.sha256(storage.get(item.image_key)).hexdigest() == item.image_sha256


# -- settings -------------------------------------------------------------------------------

def test_png_level_and_store_threads_come_from_the_settings(embedded_env: dict[str, str]) -> None:
    defaults = Settings.load(embedded_env)
    assert (defaults.png_level, defaults.store_threads) == (1, default_store_threads())
    assert [default_store_threads(cores) for cores in (1, 2, 6, 64)] == [1, 2, 6, 8]
    chosen = Settings.load({**embedded_env, "SDQ_PNG_LEVEL": "6", "SDQ_STORE_THREADS": "3"})
    runner = runner_from_settings(chosen, open_database(chosen.database_url), "unused")
    assert (runner.png_level, runner.store_threads) == (6, 3)
    for name, value in (("SDQ_PNG_LEVEL", "10"), ("SDQ_STORE_THREADS", "0")):
        with pytest.raises(ValueError, match=f"^{name}: expected .* to .*, got {value}$"):
            Settings.load({**embedded_env, name: value})


def test_the_png_level_setting_changes_the_stored_file_not_its_pixels(
        embedded_env: dict[str, str], tiny_checkpoint: Path) -> None:
    stored = {}
    for level in ("0", "9"):
        settings = Settings.load({**embedded_env, "SDQ_PNG_LEVEL": level,
                                  "SDQ_HOME": f"{embedded_env['SDQ_HOME']}-{level}"})
        result = submit(settings, specs(1), model=identify_model(tiny_checkpoint),
                        make_runner=runner_from_settings)
        [item] = job_items(open_database(settings.database_url), result.job_id)
        stored[level] = open_storage(settings.storage_url).get(item.image_key)
    assert len(stored["0"]) > 64 * 64 * 3 > len(stored["9"])
    assert Image.open(io.BytesIO(stored["0"])).tobytes() == Image.open(io.BytesIO(stored["9"])).tobytes()


# -- threads and the bounded queue ----------------------------------------------------------

class MeetingStorage(LocalStorage):
    """Each put waits until `threads` puts are under way at once, so a run completes only if
    that many store threads really work side by side; it notes which threads put."""

    def __init__(self, root: Path, threads: int) -> None:
        super().__init__(root)
        self.meeting = threading.Barrier(threads, timeout=60)
        self.threads: set[str] = set()

    def put(self, key: str, data: bytes, **options: Any) -> None:
        self.threads.add(threading.current_thread().name)
        self.meeting.wait()
        super().put(key, data, **options)


def test_one_chunk_is_stored_by_every_store_thread(embedded: Settings, tiny_pipeline: Pipeline) -> None:
    engine = open_database(embedded.database_url)
    job_id, batches = queued_job(engine, tiny_pipeline.sha256, specs(6, steps=1), 8)
    storage = MeetingStorage(Path(embedded.storage_url), threads=3)
    runner = Runner(engine=engine, storage=storage, model_ref="", pipeline=tiny_pipeline,
                    store_threads=3)
    assert runner.run(batches).done == 6
    assert len(storage.threads) == 3 and all(t.startswith("sdq-store") for t in storage.threads)
    assert [i.batch_position for i in job_items(engine, job_id)] == list(range(6))


def test_parts_recorded_at_once_on_postgresql_close_their_job(
        pg_url: str, tmp_path: Path, tiny_pipeline: Pipeline) -> None:
    """The two parts of the job's only chunk upload together and so record together: each
    transaction must not miss the other's items when it decides whether the job is over."""
    engine = open_database(pg_url)
    for _ in range(3):
        job_id, batches = queued_job(engine, tiny_pipeline.sha256, specs(2, steps=1), 8)
        runner = Runner(engine=engine, storage=MeetingStorage(tmp_path, threads=2), model_ref="",
                        pipeline=tiny_pipeline, store_threads=2)
        assert runner.run(batches).done == 2
        with Session(engine) as session:
            assert session.get(Job, job_id).status == Status.DONE


class BackedUpStorage(LocalStorage):
    """Storage that falls behind: each put first waits until the runner holds `behind` images
    it has not stored yet (or has made them all), then takes a while. It counts what the
    runner made and stored, and the most images ever made but not yet stored."""

    def __init__(self, root: Path, behind: int, total: int) -> None:
        super().__init__(root)
        self.behind, self.total = behind, total
        self.made = self.stored = self.most_unstored = 0
        self.changed = threading.Condition()

    def note_made(self, count: int) -> None:
        with self.changed:
            self.made += count
            self.most_unstored = max(self.most_unstored, self.made - self.stored)
            self.changed.notify_all()

    def put(self, key: str, data: bytes, **options: Any) -> None:
        with self.changed:
            assert self.changed.wait_for(
                lambda: self.made - self.stored >= self.behind or self.made == self.total, 60)
        time.sleep(0.1)
        super().put(key, data, **options)
        with self.changed:
            self.stored += 1
            self.changed.notify_all()


class ReportingPipeline(Pipeline):
    """The tiny pipeline, telling the storage about every image it makes."""

    def __init__(self, pipe: Pipeline, storage: BackedUpStorage) -> None:
        super().__init__(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, sha256=pipe.sha256,
                         name=pipe.name, device=pipe.device, dtype=pipe.dtype)
        self.storage = storage

    def generate(self, requests, **settings):  # type: ignore[no-untyped-def]
        images = super().generate(requests, **settings)
        self.storage.note_made(len(images))
        return images


def test_a_slow_store_holds_the_generator_back(embedded: Settings, tiny_pipeline: Pipeline) -> None:
    """Chunks of one image: at most QUEUED_CHUNKS wait or are being stored, plus the one just
    made; the storage waits until the runner is at that limit, so the limit is also reached."""
    engine = open_database(embedded.database_url)
    job_id, batches = queued_job(engine, tiny_pipeline.sha256, specs(8, steps=1), 8)
    storage = BackedUpStorage(Path(embedded.storage_url), behind=QUEUED_CHUNKS + 1, total=8)
    runner = Runner(engine=engine, storage=storage, model_ref="", micro_batch=1, store_threads=1,
                    pipeline=ReportingPipeline(tiny_pipeline, storage))
    assert runner.run(batches).done == 8
    assert storage.most_unstored == QUEUED_CHUNKS + 1
    assert_exactly_once(engine, storage, job_id, attempts=1)


# -- exactly-once while storing --------------------------------------------------------------

class TakenOverStorage(LocalStorage):
    """The first put stalls long enough for the item's lease to run out and another worker to
    take it over, run it and record it; only then does the stalled upload land."""

    def __init__(self, root: Path, take_over: Any) -> None:
        super().__init__(root)
        self.take_over = take_over

    def put(self, key: str, data: bytes, **options: Any) -> None:
        take_over, self.take_over = self.take_over, None
        if take_over:
            take_over()
        super().put(key, data, **options)


def test_an_upload_whose_claim_was_lost_leaves_the_winner_alone(
        embedded: Settings, tiny_pipeline: Pipeline) -> None:
    engine = open_database(embedded.database_url)
    job_id, batches = queued_job(engine, tiny_pipeline.sha256, specs(1, steps=1), 8)
    root = Path(embedded.storage_url)

    def take_over() -> None:
        with Session(engine) as session, session.begin():
            session.execute(update(Item).values(lease_expires_at=utcnow()))
        winner = Runner(engine=engine, storage=LocalStorage(root), model_ref="",
                        pipeline=tiny_pipeline, worker_name="winner")
        assert winner.run(batches).done == 1

    loser = Runner(engine=engine, storage=TakenOverStorage(root, take_over), model_ref="",
                   pipeline=tiny_pipeline, worker_name="loser")
    assert loser.run(batches).done == 0
    assert_exactly_once(engine, LocalStorage(root), job_id, attempts=2)
    [item] = job_items(engine, job_id)
    assert (item.worker_host, item.image_key) == ("winner", f"{job_id}/{item.id}-2.png")


def test_uploads_that_keep_failing_hand_the_items_back_and_a_rerun_stores_them_once(
        embedded: Settings, tiny_pipeline: Pipeline, s3_server: S3Server,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """503s that outlast the outage window hand the item back to the queue with the reason,
    its attempt not counted (the store was down, not the item at fault); the next delivery
    stores it once."""
    bucket = f"sdq-{uuid.uuid4().hex[:12]}"
    s3_server.client().create_bucket(Bucket=bucket)
    engine = open_database(embedded.database_url)
    job_id, batches = queued_job(engine, tiny_pipeline.sha256, specs(1, steps=1), 8)
    with FlakyProxy(s3_server.endpoint, failures=4, mode="503") as proxy:
        aws: Mapping[str, str] = {
            "AWS_ENDPOINT_URL": proxy.endpoint, "AWS_ACCESS_KEY_ID": s3_server.access_key,
            "AWS_SECRET_ACCESS_KEY": s3_server.secret_key, "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true"}
        for name, value in aws.items():
            monkeypatch.setenv(name, value)
        storage = open_storage(f"s3://{bucket}/img", max_attempts=2)
        runner = Runner(engine=engine, storage=storage, model_ref="", pipeline=tiny_pipeline,
                        max_attempts=2, outage_s=0.1)
        with pytest.raises(TransientError, match=r"storing images failed 1 times over 0s"):
            runner.run(batches)
        [item] = job_items(engine, job_id)
        assert (item.status, item.attempts) == (Status.QUEUED, 0) and "SlowDown" in item.last_error
        runner.outage_s = 60
        assert runner.run(batches).done == 1
        assert proxy.requests > 4
        assert_exactly_once(engine, storage, job_id, attempts=1)
