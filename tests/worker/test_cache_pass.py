"""The result cache pass on a real index and image folder, without a model: which items reuse
a stored image, and what their rows say afterwards."""
from __future__ import annotations

import hashlib
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import update
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from sdq.core.params import GenerationParams
from sdq.core.settings import Settings
from sdq.db.base import utcnow
from sdq.db.models import Item, Job, Status
from sdq.db.session import open_database, read_only
from sdq.images.storage import LocalStorage
from sdq.worker.cache import Identity, ResultCache, identify
from tests.fakes import FakePipeline

from .conftest import job_items, queued_job, specs

MODEL = Identity("c" * 64, "cpu", "fp32")


@pytest.fixture
def engine(embedded: Settings) -> Engine:
    return open_database(embedded.database_url)


@pytest.fixture
def storage(embedded: Settings) -> LocalStorage:
    return LocalStorage(Path(embedded.storage_url))


def result_cache(engine: Engine, storage: LocalStorage, watermark: str | None = "mark") -> ResultCache:
    return ResultCache(sessionmaker(read_only(engine)), sessionmaker(engine), storage,
                       watermark=watermark, worker_name="w1")


def made(engine: Engine, storage: LocalStorage, cache: ResultCache, count: int) -> list[Item]:
    """A job of `count` items done as a runner leaves them: cache key, image key and sha256,
    and the object stored."""
    job_id, [batch] = queued_job(engine, MODEL.sha256, specs(count), 8, prefix="made")
    with Session(engine) as session, session.begin():
        for item in session.query(Item).filter(Item.job_id == job_id):
            data = f"png of {item.id}".encode()
            storage.put(f"{job_id}/{item.id}.png", data)
            session.execute(update(Item).where(Item.id == item.id).values(
                status=Status.DONE, cache_key=cache.key(GenerationParams.of(item), MODEL),
                image_key=f"{job_id}/{item.id}.png", image_sha256=hashlib.sha256(data).hexdigest(),
                watermark="mark", finished_at=utcnow()))
    return job_items(engine, job_id)


def test_items_whose_image_is_stored_finish_as_reusing_it(engine: Engine, storage: LocalStorage) -> None:
    cache = result_cache(engine, storage)
    before = made(engine, storage, cache, 3)
    storage.delete(before[2].image_key)  # the third one's object is gone: it must be made again
    job_id, batches = queued_job(engine, MODEL.sha256, specs(3), 8, prefix="again")
    reused = cache.reuse(batches, MODEL)
    after = job_items(engine, job_id)
    assert reused == {after[0].id, after[1].id}
    assert [(r.status, r.reused_from, r.image_key, r.image_sha256, r.watermark, r.cache_key)
            for r in after[:2]] == [
        (Status.DONE, b.id, b.image_key, b.image_sha256, "mark", b.cache_key) for b in before[:2]]
    assert {(r.worker_host, r.device, r.duration_s) for r in after[:2]} == {("w1", "cpu", 0.0)}
    assert (after[2].status, after[2].reused_from) == (Status.PENDING, None)
    with Session(engine) as session:  # one item still to make: the job is not over
        assert session.get(Job, job_id).status == Status.PENDING


def test_nothing_is_reused_across_what_changes_the_pixels_or_from_a_job_that_refuses(
        engine: Engine, storage: LocalStorage) -> None:
    cache = result_cache(engine, storage)
    made(engine, storage, cache, 1)
    _, batches = queued_job(engine, MODEL.sha256, specs(1), 8, prefix="other")
    assert cache.reuse(batches, Identity(MODEL.sha256, "cpu", "fp16")) == set()
    assert result_cache(engine, storage, watermark=None).reuse(batches, MODEL) == set()
    _, refusing = queued_job(engine, MODEL.sha256, specs(1), 8, job=Job(reuse=False), prefix="no")
    assert cache.reuse(refusing, MODEL) == set()


def test_an_item_another_worker_runs_is_left_to_it(engine: Engine, storage: LocalStorage) -> None:
    cache = result_cache(engine, storage)
    made(engine, storage, cache, 1)
    job_id, batches = queued_job(engine, MODEL.sha256, specs(1), 8, prefix="leased")
    with Session(engine) as session, session.begin():
        session.execute(update(Item).where(Item.job_id == job_id).values(
            status=Status.RUNNING, worker_host="w2", attempts=1,
            lease_expires_at=utcnow() + timedelta(seconds=60)))
    assert cache.reuse(batches, MODEL) == set()
    assert [(r.status, r.worker_host) for r in job_items(engine, job_id)] == [(Status.RUNNING, "w2")]


def test_the_model_is_identified_without_loading_it(tmp_path: Path, tiny_checkpoint: Path) -> None:
    """The cache runs before the model loads: a model that cannot be found skips it (loading
    then fails the items with the reason)."""
    pipe = FakePipeline("d" * 64)
    assert identify(pipe, "unused", device=None, dtype=None, hash_cache=None) == Identity(
        "d" * 64, "cpu", "fp32")
    assert identify(None, str(tmp_path / "missing.safetensors"), device="cpu", dtype=None,
                    hash_cache=None) is None
    found = identify(None, str(tiny_checkpoint), device="cpu", dtype=None,
                     hash_cache=tmp_path / "hashes.json")
    assert found is not None and (found.device, found.dtype) == ("cpu", "fp32")
    assert len(found.sha256) == 64
