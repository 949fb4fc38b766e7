"""The batch runner in embedded mode: what `sdq submit` does with no broker configured."""
from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import torch
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from sdq.db.models import Item, Job, Model, Status
from sdq.db.queries import submit_job
from sdq.db.session import open_database
from sdq.sdmodel.pipeline import Pipeline, load_pipeline
from sdq.images.provenance import read_png_metadata
from sdq.images.storage import open_storage
from sdq.jobs.submit import identify_model, plan_batches, submit
from sdq.core.batch import Batch
from sdq.worker.runner import Runner
from sdq.core.settings import Settings
from sdq.worker.factory import runner_from_settings
from tests.conftest import stand_in_checkpoint
from tests.s3server import FlakyProxy, S3Server

from .conftest import job_items, specs


def test_submit_runs_every_item_and_records_it(embedded: Settings, tiny_checkpoint: Path) -> None:
    recorded: list[int] = []
    result = submit(embedded, specs(5), model=identify_model(tiny_checkpoint), batch_size=2,
                    on_recorded=recorded.append, make_runner=runner_from_settings)
    assert (result.items, result.batches, result.queue) == (5, 3, None)
    assert result.report is not None and result.report.done == sum(recorded) == 5
    engine = open_database(embedded.database_url)
    items = job_items(engine, result.job_id)
    storage = open_storage(embedded.storage_url)
    assert sorted(storage.list()) == sorted(f"{result.job_id}/{i.id}.png" for i in items)
    assert [(i.status, i.attempts, i.batch_position) for i in items] == [
        (Status.DONE, 1, 0), (Status.DONE, 1, 1)] * 2 + [(Status.DONE, 1, 0)]
    for item in items:
        meta = read_png_metadata(storage.get(item.image_key))
        assert (meta.provenance.item_id, meta.provenance.params.seed, meta.provenance.batch_id) == (
            item.id, item.seed, item.batch_id)
        assert item.image_sha256 and item.device == "cpu" and item.duration_s > 0
    with Session(engine) as session:
        assert session.get(Job, result.job_id).status == Status.DONE


def test_a_planned_batch_is_denoised_in_micro_batches_the_device_holds(
        embedded: Settings, tiny_checkpoint: Path) -> None:
    """The submitter plans batches of 32 whatever the hardware; a CPU worker denoises them 8
    at a time (`Pipeline.default_batch_size`), each micro-batch its own chunk."""
    result = submit(embedded, specs(10, steps=1), model=identify_model(tiny_checkpoint),
                    make_runner=runner_from_settings)
    assert (result.items, result.batches) == (10, 1)
    items = job_items(open_database(embedded.database_url), result.job_id)
    chunks: dict[str, list[int]] = {}
    for item in items:
        chunks.setdefault(item.batch_id, []).append(item.batch_position)
    assert sorted(map(len, chunks.values())) == [2, 8] and all(i.status == Status.DONE for i in items)
    assert sorted(chunks.values(), key=len) == [[0, 1], list(range(8))]


def test_a_bad_or_empty_submission_records_nothing(embedded: Settings, tiny_checkpoint: Path) -> None:
    model = identify_model(tiny_checkpoint)
    with pytest.raises(ValueError, match="nothing to submit"):
        submit(embedded, [], model=model, make_runner=runner_from_settings)
    with pytest.raises(ValueError, match=r"item 1: missing field\(s\) \['seed'\]"):
        submit(embedded, [specs(1)[0], {k: v for k, v in specs(1)[0].items() if k != "seed"}],
               model=model, make_runner=runner_from_settings)
    with Session(open_database(embedded.database_url)) as session:
        assert session.scalar(select(func.count()).select_from(Job)) == 0


def test_a_batch_delivered_again_is_skipped(embedded: Settings, tiny_checkpoint: Path) -> None:
    result = submit(embedded, specs(3), model=identify_model(tiny_checkpoint),
                    make_runner=runner_from_settings)
    engine = open_database(embedded.database_url)
    before = {i.id: (i.image_sha256, i.finished_at) for i in job_items(engine, result.job_id)}
    runner = Runner(engine=engine, storage=open_storage(embedded.storage_url),
                    model_ref=str(tiny_checkpoint), device="cpu")
    report = runner.run([Batch("again", tuple(before))])
    assert (report.done, report.skipped) == (0, 3)
    assert {i.id: (i.image_sha256, i.finished_at) for i in job_items(engine, result.job_id)} == before


def test_a_broken_model_fails_the_items_with_the_reason(embedded: Settings, tmp_path: Path) -> None:
    broken = tmp_path / "broken.safetensors"
    stand_in_checkpoint(broken)  # passes the header check, fails to load
    result = submit(embedded, specs(2), model=identify_model(broken), make_runner=runner_from_settings)
    assert result.report is not None and result.report.failed == 2
    items = job_items(open_database(embedded.database_url), result.job_id)
    assert {i.status for i in items} == {Status.FAILED}
    assert items[0].last_error.startswith(f"model: {broken}")
    with Session(open_database(embedded.database_url)) as session:
        assert session.get(Job, result.job_id).status == Status.FAILED


class TwoImageGpu(Pipeline):
    """A pipeline on a stand-in GPU that runs out of memory above two images per batch."""

    def __init__(self, pipe: Pipeline) -> None:
        super().__init__(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, sha256=pipe.sha256,
                         name=pipe.name, device=pipe.device, dtype=pipe.dtype)
        self.sizes: list[int] = []

    def generate(self, requests, **settings):  # type: ignore[no-untyped-def]
        self.sizes.append(len(requests))
        if len(requests) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return super().generate(requests, **settings)


def test_out_of_memory_halves_the_batch(embedded: Settings, tiny_checkpoint: Path) -> None:
    """The runner goes on at half the size, and each item records the batch it really ran in."""
    pipe = TwoImageGpu(load_pipeline(tiny_checkpoint, device="cpu"))
    engine = open_database(embedded.database_url)
    with Session(engine) as session:
        session.add(model := Model(sha256=pipe.sha256, name="tiny", architecture="sd-v1"))
        session.flush()
        job = submit_job(session, Job(), [{**s, "model_id": model.id} for s in specs(5)])
        session.commit()
        batches = plan_batches(session, Item.job_id == job.id, 8, prefix="oom")[pipe.sha256]
    runner = Runner(engine=engine, storage=open_storage(embedded.storage_url), model_ref="",
                    pipeline=pipe)
    assert runner.run(batches).done == 5
    assert pipe.sizes == [5, 2, 2, 1] and runner.micro_batch == 2
    items = job_items(engine, job.id)
    assert [i.batch_position for i in items] == [0, 1, 0, 1, 0]
    assert len({i.batch_id for i in items}) == 3


def test_a_transient_storage_failure_is_retried(
        embedded_env: dict[str, str], s3_server: S3Server, tiny_checkpoint: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Two 503s exhaust the S3 client's own attempts (SDQ_MAX_ATTEMPTS=2); the runner's retry
    gets the image through, once."""
    bucket = f"sdq-{uuid.uuid4().hex[:12]}"
    s3_server.client().create_bucket(Bucket=bucket)
    with FlakyProxy(s3_server.endpoint, failures=2, mode="503") as proxy:
        for name, value in {"AWS_ENDPOINT_URL": proxy.endpoint, "AWS_ACCESS_KEY_ID": s3_server.access_key,
                            "AWS_SECRET_ACCESS_KEY": s3_server.secret_key, "AWS_DEFAULT_REGION": "us-east-1",
                            "AWS_EC2_METADATA_DISABLED": "true"}.items():
            monkeypatch.setenv(name, value)
        settings = Settings.load({**embedded_env, "SDQ_STORAGE_URL": f"s3://{bucket}/img",
                                  "SDQ_MAX_ATTEMPTS": "2"})
        result = submit(settings, specs(1, steps=1), model=identify_model(tiny_checkpoint),
                        make_runner=runner_from_settings)
        assert proxy.requests == 3
    [item] = job_items(open_database(settings.database_url), result.job_id)
    assert (item.status, item.attempts) == (Status.DONE, 1)
    assert list(s3_server.client().list_objects_v2(Bucket=bucket)["Contents"])[0]["Key"] == \
        f"img/{item.image_key}"
