"""The result cache: an item whose image is already stored reuses it instead of generating."""
from __future__ import annotations

import hashlib
import os
import shutil
import threading
from pathlib import Path
from typing import Callable

from safetensors.torch import save_file
from sqlalchemy.orm import Session

from sdq.db.models import Item, Job, Model, Status
from sdq.db.queries import submit_job
from sdq.db.session import open_database
from sdq.core.params import GenerationParams, cache_key
from sdq.sdmodel.pipeline import load_pipeline
from sdq.images.provenance import ItemRecord, verify_png
from sdq.core.batch import RunReport
from sdq.images.storage import S3Storage, open_storage
from sdq.jobs.maintenance import Purged, purge_job
from sdq.jobs.submit import identify_model, plan_batches, submit
from sdq.worker.runner import Runner
from sdq.core.settings import Settings
from sdq.worker.factory import runner_from_settings

from tests.fakes import FakePipeline

from ..conftest import build_tiny_networks, ldm_checkpoint
from .cluster import WorkerProcess, wait_for
from .conftest import job_items, queued_job, specs
from .test_distributed import wait_until_done


def test_the_key_covers_what_decides_the_pixels() -> None:
    params = GenerationParams(prompt="a fox", seed=1)
    where = {"model_sha256": "ab" * 32, "watermark": "StableDiffusionV1", "device": "cuda:0",
             "dtype": "fp16"}
    key = cache_key(params, **where)
    assert key == cache_key(params, **{**where, "device": "cuda:1"})  # the kind, not the index
    for change in ({"device": "cpu"}, {"dtype": "fp32"}, {"watermark": None},
                   {"model_sha256": "cd" * 32}):
        assert cache_key(params, **{**where, **change}) != key, change
    for field, value in (("prompt", "a cat"), ("negative_prompt", "blur"), ("seed", 2),
                         ("sampler", "euler"), ("steps", 20), ("cfg", 5.0), ("eta", 0.5),
                         ("width", 256), ("height", 256)):
        other = GenerationParams(**{**params.to_dict(), field: value})
        assert cache_key(other, **where) != key, field


def test_a_job_made_again_reuses_every_image(embedded: Settings, tiny_checkpoint: Path) -> None:
    """Runs the second job with a runner of its own, to read what it generated."""
    model = identify_model(tiny_checkpoint)
    first = submit(embedded, specs(3, steps=1), model=model, make_runner=runner_from_settings)
    engine = open_database(embedded.database_url)
    storage = open_storage(embedded.storage_url)
    with Session(engine) as session:
        model_id = session.query(Model.id).filter_by(sha256=model.sha256).scalar()
        job = submit_job(session, Job(), [{**s, "model_id": model_id} for s in specs(3, steps=1)])
        session.commit()
        batches = plan_batches(session, Item.job_id == job.id, 2, prefix="again")[model.sha256]
    runner = Runner(engine=engine, storage=storage, model_ref="", watermark=embedded.watermark,
                    pipeline=load_pipeline(tiny_checkpoint, device="cpu"))
    report = runner.run(batches)
    assert (report.done, report.reused, runner.images_done, runner.images_reused) == (3, 3, 0, 3)
    made, again = job_items(engine, first.job_id), job_items(engine, job.id)
    assert [i.reused_from for i in made] == [None] * 3
    assert [i.reused_from for i in again] == [i.id for i in made]
    assert [(i.image_key, i.image_sha256, i.cache_key) for i in again] == \
        [(i.image_key, i.image_sha256, i.cache_key) for i in made]
    assert {i.status for i in again} == {Status.DONE} and all(i.cache_key for i in made)
    assert sorted(storage.list()) == sorted(i.image_key for i in made)  # nothing new stored
    with Session(engine) as session:
        assert session.get(Job, job.id).status == Status.DONE
    # Purging the job that made the images leaves them to the job that reuses them, whose
    # rows still verify (the file names the item that made it); the last job takes them.
    assert purge_job(engine, storage, first.job_id) == Purged(first.job_id, 3, 0, 3)
    with Session(engine) as session:
        reused = session.get(Item, again[0].id)
        assert verify_png(storage.get(reused.image_key), ItemRecord.of(reused)).ok
    assert purge_job(engine, storage, job.id) == Purged(job.id, 3, 3, 0)
    assert list(storage.list()) == []


def test_no_reuse_and_a_deleted_object_generate(embedded: Settings, tiny_checkpoint: Path) -> None:
    model = identify_model(tiny_checkpoint)
    first = submit(embedded, specs(3, steps=1), model=model, make_runner=runner_from_settings)
    forced = submit(embedded, specs(3, steps=1), model=model, job=Job(reuse=False),
                    make_runner=runner_from_settings)
    assert forced.report is not None and (forced.report.done, forced.report.reused) == (3, 0)
    engine = open_database(embedded.database_url)
    storage = open_storage(embedded.storage_url)
    # Both jobs' objects of item 0 gone: the third job makes that one again, reuses the rest.
    for job_id in (first.job_id, forced.job_id):
        storage.delete(job_items(engine, job_id)[0].image_key)
    third = submit(embedded, specs(3, steps=1), model=model, make_runner=runner_from_settings)
    assert third.report is not None and (third.report.done, third.report.reused) == (3, 2)
    remade, *reused = job_items(engine, third.job_id)
    assert remade.reused_from is None and storage.exists(remade.image_key)
    assert remade.image_key.startswith(f"{third.job_id}/")
    assert [i.reused_from for i in reused] == [i.id for i in job_items(engine, first.job_id)[1:]]


def test_a_worker_reuses_without_generating(
        distributed: Settings, start_worker: Callable[[str], WorkerProcess],
        tiny_checkpoint: Path) -> None:
    worker = start_worker("cache")
    worker.wait_ready()
    model = identify_model(tiny_checkpoint)
    first = submit(distributed, specs(3, steps=1), model=model)
    wait_until_done(distributed, first.job_id)
    wait_for("the heartbeat to count 3 images",
             lambda: (worker.record() or {}).get("images_done") == 3, timeout=30)
    second = submit(distributed, specs(3, steps=1), model=model)
    wait_until_done(distributed, second.job_id)
    wait_for("the heartbeat to count 3 reused",
             lambda: (worker.record() or {}).get("images_reused") == 3, timeout=30)
    assert (worker.record() or {})["images_done"] == 3  # nothing generated for the second
    engine = open_database(distributed.database_url)
    made, again = job_items(engine, first.job_id), job_items(engine, second.job_id)
    assert [i.reused_from for i in again] == [i.id for i in made]
    assert sorted(open_storage(distributed.storage_url).list()) == sorted(i.image_key for i in made)


def test_a_checkpoint_replaced_in_place_is_neither_reused_nor_run_under_its_old_hash(
        embedded: Settings, tiny_checkpoint: Path, tmp_path: Path) -> None:
    """Replaced by weights of the same size with its time kept (`cp -p`): a job recorded for
    the old weights fails with the reason, instead of reusing or making images under a hash
    they were not made with."""
    path = tmp_path / "model.safetensors"
    shutil.copy2(tiny_checkpoint, path)
    hashes = embedded.home / "hashes.json"
    old = identify_model(path, hashes)
    first = submit(embedded, specs(2, steps=1), model=old, make_runner=runner_from_settings)
    assert first.report is not None and first.report.done == 2
    other = tmp_path / "other.safetensors"
    save_file(ldm_checkpoint(*build_tiny_networks(seed=1)), str(other))
    st = path.stat()
    assert other.stat().st_size == st.st_size
    shutil.copy2(other, path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert identify_model(path, hashes).sha256 != old.sha256

    engine = open_database(embedded.database_url)
    with Session(engine) as session:  # a job recorded for the old weights, run after the change
        model_id = session.query(Model.id).filter_by(sha256=old.sha256).scalar()
        job = submit_job(session, Job(), [{**s, "model_id": model_id} for s in specs(2, steps=1)])
        session.commit()
        batches = plan_batches(session, Item.job_id == job.id, 2, prefix="after")[old.sha256]
    report = runner_from_settings(embedded, engine, str(path)).run(batches)
    assert (report.done, report.reused) == (0, 0)
    items = job_items(engine, job.id)
    assert {i.status for i in items} == {Status.FAILED}
    assert {i.image_key for i in items} == {None}
    assert items[0].last_error.startswith(f"model {path} changed since the job was submitted: "
                                          f"its sha256 is now {identify_model(path).short_hash}, "
                                          f"the job recorded {old.short_hash}")


class HeldAfterLookup(S3Storage):
    """The store on the S3 server, holding a worker between its cache lookup's HEAD request
    (answered: the object is there) and its write, as a slow S3 answer does."""

    def __init__(self, url: str) -> None:
        bucket, _, prefix = url.removeprefix("s3://").partition("/")
        super().__init__(bucket, prefix)
        self.looked_up, self.go = threading.Event(), threading.Event()

    def exists(self, key: str) -> bool:
        found = super().exists(key)
        self.looked_up.set()
        assert self.go.wait(60), "the test never let the lookup go on"
        return found


def test_a_purge_between_lookup_and_write_costs_a_generation_never_an_image(
        distributed: Settings) -> None:
    """Issue 25.2, on PostgreSQL and S3: the purge of the job whose images a second job is
    about to reuse commits while that reuse waits on storage; the second job's items end done
    with objects that are there (made again), not pointing at deleted ones."""
    engine = open_database(distributed.database_url)
    pipe = FakePipeline("9" * 64)
    direct = open_storage(distributed.storage_url)
    first_id, first = queued_job(engine, pipe.sha256, specs(3, steps=1), 8, prefix="made")
    Runner(engine=engine, storage=direct, model_ref="", pipeline=pipe, worker_name="w1").run(first)
    made = job_items(engine, first_id)
    assert {i.status for i in made} == {Status.DONE}

    held = HeldAfterLookup(distributed.storage_url)
    second_id, second = queued_job(engine, pipe.sha256, specs(3, steps=1), 8, prefix="again")
    runner = Runner(engine=engine, storage=held, model_ref="", pipeline=pipe, worker_name="w2")
    reports: list[RunReport] = []
    run = threading.Thread(target=lambda: reports.append(runner.run(second)), name="reusing-run")
    run.start()
    try:
        assert held.looked_up.wait(60)
        assert purge_job(engine, direct, first_id).images == 3
    finally:
        held.go.set()
        run.join(120)
    assert not run.is_alive() and reports
    assert (reports[0].done, reports[0].reused) == (3, 0)
    again = job_items(engine, second_id)
    assert [(i.status, i.reused_from) for i in again] == [(Status.DONE, None)] * 3
    for item in again:
        assert item.image_key.startswith(f"{second_id}/")
        assert hashlib.sha256(direct.get(item.image_key)).hexdigest() == item.image_sha256
