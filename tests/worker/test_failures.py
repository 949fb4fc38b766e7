"""Nothing stranded: whatever goes wrong in a run, every item ends done, failed with its true
reason, or handed back to the queue, and the other items of the run go on."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from sqlalchemy.orm import Session

from sdq.db.models import Job, Status
from sdq.db.session import open_database
from sdq.sdmodel.pipeline import Pipeline, load_pipeline
from sdq.images.storage import LocalStorage
from sdq.jobs.submit import identify_model, submit
from sdq.worker.runner import Runner
from sdq.core.settings import Settings
from sdq.worker.factory import runner_from_settings
from tests.conftest import build_tiny_networks, ldm_checkpoint

from .conftest import job_items, queued_job, specs


@pytest.fixture(scope="module")
def tiny_pipeline(tiny_checkpoint: Path) -> Pipeline:
    return load_pipeline(tiny_checkpoint, device="cpu")


class SmallMemory(Pipeline):
    """A pipeline on a machine whose allocator cannot hold a 128x128 image: it raises what
    PyTorch's CPU allocator raises, and a poisoned prompt breaks a batch the way a bug would."""

    def __init__(self, pipe: Pipeline) -> None:
        super().__init__(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, sha256=pipe.sha256,
                         name=pipe.name, device=pipe.device, dtype=pipe.dtype)

    def generate(self, requests, **settings):  # type: ignore[no-untyped-def]
        if settings["width"] >= 128:
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: "
                               "can't allocate memory: you tried to allocate 8589934592 bytes")
        if any("poison" in r.prompt for r in requests):
            raise IndexError("index 77 is out of bounds for dimension 1 with size 77")
        return super().generate(requests, **settings)


def test_a_model_that_fails_to_load_fails_its_items_with_the_reason(
        embedded: Settings, tmp_path: Path) -> None:
    """A wrong-dtype weight makes `load_state_dict` raise RuntimeError: the items fail, one
    attempt each, with PyTorch's message; nothing is left queued to crash again."""
    weights = ldm_checkpoint(*build_tiny_networks())
    key = "model.diffusion_model.input_blocks.0.0.weight"
    weights[key] = weights[key].to(torch.int8)
    broken = tmp_path / "int8-conv-in.safetensors"
    save_file(weights, str(broken))
    result = submit(embedded, specs(3, steps=1), model=identify_model(broken), batch_size=2,
                    make_runner=runner_from_settings)
    assert result.report is not None and result.report.failed == 3
    items = job_items(open_database(embedded.database_url), result.job_id)
    assert {(i.status, i.attempts) for i in items} == {(Status.FAILED, 1)}
    assert all(i.last_error.startswith("model: Error(s) in loading state_dict") and
               "input_blocks.0.0.weight" in i.last_error for i in items)
    with Session(open_database(embedded.database_url)) as session:
        assert session.get(Job, result.job_id).status == Status.FAILED


def test_an_item_too_big_for_memory_fails_alone_and_the_rest_of_the_message_goes_on(
        embedded: Settings, tiny_pipeline: Pipeline) -> None:
    engine = open_database(embedded.database_url)
    small = specs(4, steps=1)
    big = {**small[2], "width": 128, "height": 128}
    job_id, batches = queued_job(engine, tiny_pipeline.sha256, [*small[:2], big, small[3]], 2)
    assert len(batches) == 3  # the big item's batch sits between two batches of small ones
    runner = Runner(engine=engine, storage=LocalStorage(Path(embedded.storage_url)), model_ref="",
                    pipeline=SmallMemory(tiny_pipeline))
    report = runner.run(batches)
    assert (report.done, report.failed) == (3, 1)
    items = job_items(engine, job_id)
    assert [(i.status, i.attempts) for i in items] == [(Status.DONE, 1)] * 2 + [
        (Status.FAILED, 1), (Status.DONE, 1)]
    assert items[2].last_error.startswith("out of memory generating one 128x128 image: ")
    assert "can't allocate memory" in items[2].last_error
    with Session(engine) as session:
        assert session.get(Job, job_id).status == Status.FAILED


def test_an_error_in_a_batch_fails_only_the_item_that_caused_it(
        embedded: Settings, tiny_pipeline: Pipeline) -> None:
    engine = open_database(embedded.database_url)
    items = specs(3, steps=1)
    items[1]["prompt"] = "poison apple"
    job_id, batches = queued_job(engine, tiny_pipeline.sha256, items, 2)
    runner = Runner(engine=engine, storage=LocalStorage(Path(embedded.storage_url)), model_ref="",
                    pipeline=SmallMemory(tiny_pipeline))
    assert (runner.run(batches).done, runner.micro_batch) == (2, None)
    rows = job_items(engine, job_id)
    assert [i.status for i in rows] == [Status.DONE, Status.FAILED, Status.DONE]
    assert rows[1].last_error == "generation: IndexError: index 77 is out of bounds for dimension 1 with size 77"


class BrokenDisk(LocalStorage):
    """A store whose writes fail with an error no storage code expects."""

    def put(self, key: str, data: bytes) -> None:
        raise MemoryError("the store thread could not allocate its buffer")


def test_an_unexpected_error_hands_back_every_claimed_item_with_the_reason(
        embedded: Settings, tiny_pipeline: Pipeline) -> None:
    engine = open_database(embedded.database_url)
    job_id, batches = queued_job(engine, tiny_pipeline.sha256, specs(3, steps=1), 2)
    runner = Runner(engine=engine, storage=BrokenDisk(Path(embedded.storage_url)), model_ref="",
                    pipeline=tiny_pipeline)
    with pytest.raises(MemoryError):
        runner.run(batches)
    rows = job_items(engine, job_id)
    assert {(i.status, i.attempts, i.lease_expires_at) for i in rows} == {(Status.QUEUED, 1, None)}
    assert {i.last_error for i in rows} == {"MemoryError: the store thread could not allocate its buffer"}
