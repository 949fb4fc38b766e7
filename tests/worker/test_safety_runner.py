"""The safety checker in the batch runner: every image scored on the worker, the verdict in the
item row and the PNG, flagged images kept, blacked out or dropped as the job asks."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import select
from sqlalchemy.orm import Session, joinedload

from sdq.db.models import Item, Job, Status
from sdq.db.session import open_database
from sdq.sdmodel.modelfiles import model_sha256
from sdq.images.provenance import ItemRecord, read_png_metadata, verify_png
from sdq.images.storage import open_storage
from sdq.jobs.submit import identify_model, submit
from sdq.core.settings import Settings
from sdq.worker.factory import runner_from_settings
from tests.conftest import TINY_CHECKERS, flag_images, save_safety_checker

from .cluster import WorkerProcess
from .conftest import job_items, specs
from .test_distributed import wait_until_done

COUNT, FLAGGED = 4, 1
"""Items per job, and the row whose image the checker is made to flag."""


def items_with_models(settings: Settings, job_id: int) -> list[Item]:
    """The job's items with their models loaded, for `ItemRecord.of` outside the session."""
    with Session(open_database(settings.database_url)) as session:
        return list(session.scalars(select(Item).options(joinedload(Item.model))
                                    .where(Item.job_id == job_id).order_by(Item.row_index)))


def run_job(settings: Settings, checkpoint: Path, **job_fields: object) -> int:
    result = submit(settings, specs(COUNT), model=identify_model(checkpoint), batch_size=COUNT,
                    job=Job(**job_fields), make_runner=runner_from_settings)
    return result.job_id


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> list[Image.Image]:
    """The images a job of `specs(COUNT)` makes (64x64: too small for a watermark, so stored
    as generated), from a run without a checker."""
    home = tmp_path_factory.mktemp("unchecked")
    settings = Settings.load({"SDQ_HOME": str(home), "SDQ_CONFIG": str(home / "none.toml"),
                              "SDQ_DEVICE": "cpu"})
    job_id = run_job(settings, tiny_checkpoint)
    storage = open_storage(settings.storage_url)
    items = job_items(open_database(settings.database_url), job_id)
    assert [(i.safety_flagged, i.safety_scores, i.safety_action) for i in items] == [(None, None, None)] * COUNT
    assert all(read_png_metadata(storage.get(i.image_key)).provenance.safety is None for i in items)
    return [Image.open(io.BytesIO(storage.get(i.image_key))).convert("RGB") for i in items]


@pytest.mark.parametrize(("on_flag", "variant"), [("keep", "vit-l14-scaled"), ("black", "other-config"),
                                                  ("drop", "vit-l14-scaled")])
def test_flagged_images_are_recorded_and_kept_blacked_or_dropped(
        embedded: Settings, tiny_checkpoint: Path, generated: list[Image.Image], tmp_path: Path,
        on_flag: str, variant: str) -> None:
    vision, projection = TINY_CHECKERS[variant]
    folder = save_safety_checker(tmp_path / "safety_checker", vision, projection)
    flag_images(folder, generated, [FLAGGED])
    job_id = run_job(embedded, tiny_checkpoint, safety_checker=str(folder), on_flag=on_flag)

    items = items_with_models(embedded, job_id)
    action = {"keep": "kept", "black": "blacked", "drop": "dropped"}[on_flag]
    assert [i.status for i in items] == [Status.DONE] * COUNT
    assert [i.safety_flagged for i in items] == [n == FLAGGED for n in range(COUNT)]
    assert [i.safety_action for i in items] == [action if n == FLAGGED else "kept" for n in range(COUNT)]
    assert {i.safety_checker_sha256 for i in items} == {model_sha256(folder)}
    for item in items:
        assert (len(item.safety_scores["concept"]), len(item.safety_scores["special"])) == (17, 3)
        assert (max(item.safety_scores["concept"]) > 0) == item.safety_flagged

    storage = open_storage(embedded.storage_url)
    flagged = items[FLAGGED]
    if on_flag == "drop":
        assert flagged.image_key is None and flagged.image_sha256 is None
        assert sorted(storage.list(f"{job_id}/")) == sorted(i.image_key for i in items if i is not flagged)
    for item, image in zip(items, generated):
        if item.image_key is None:
            continue
        data = storage.get(item.image_key)
        stored = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        expected = np.zeros_like(stored) if item.safety_action == "blacked" else np.asarray(image)
        assert np.array_equal(stored, expected)
        safety = read_png_metadata(data).provenance.safety
        assert (safety.flagged, safety.action, safety.checker_sha256, safety.scores) == (
            item.safety_flagged, item.safety_action, item.safety_checker_sha256, item.safety_scores)
        verification = verify_png(data, ItemRecord.of(item))
        assert verification.ok, verification.checks
    with Session(open_database(embedded.database_url)) as session:
        assert session.get(Job, job_id).status == Status.DONE


def test_a_checker_that_cannot_load_fails_the_items_with_the_reason(
        embedded: Settings, tiny_checkpoint: Path, tmp_path: Path) -> None:
    """A job that asked for a check never runs without one."""
    job_id = run_job(embedded, tiny_checkpoint, safety_checker=str(tmp_path / "gone"))
    items = job_items(open_database(embedded.database_url), job_id)
    assert {i.status for i in items} == {Status.FAILED}
    assert items[0].last_error.startswith(f"safety checker: {tmp_path / 'gone'}: no such safety checker")
    assert all(i.image_key is None for i in items)


def test_a_distributed_worker_checks_with_the_jobs_checker(
        distributed: Settings, start_worker: Callable[[str], WorkerProcess], tiny_checkpoint: Path,
        flag_all_checker: Path) -> None:
    """The worker process loads the checker the job names and applies the job's on_flag."""
    worker = start_worker("safety")
    worker.wait_ready()
    result = submit(distributed, specs(3, steps=1), model=identify_model(tiny_checkpoint), batch_size=3,
                    job=Job(safety_checker=str(flag_all_checker), on_flag="black"))
    wait_until_done(distributed, result.job_id)
    items = items_with_models(distributed, result.job_id)
    assert [(i.status, i.safety_flagged, i.safety_action) for i in items] == [
        (Status.DONE, True, "blacked")] * 3
    assert {i.safety_checker_sha256 for i in items} == {model_sha256(flag_all_checker / "safety_checker")}
    storage = open_storage(distributed.storage_url)
    for item in items:
        data = storage.get(item.image_key)
        assert not np.asarray(Image.open(io.BytesIO(data))).any()
        assert read_png_metadata(data).provenance.safety.action == "blacked"
        assert verify_png(data, ItemRecord.of(item)).ok


@pytest.mark.slow
def test_the_cache_keeps_each_jobs_safety_promise(
        embedded: Settings, tiny_checkpoint: Path, generated: list[Image.Image], tmp_path: Path) -> None:
    """Issue 25.1 end to end: a job that drops flagged images, after an unchecked twin, reuses
    none of its images (each is checked, the flagged one dropped); its own twin then reuses
    every stored image with the verdict it carries, and makes the dropped one again (no image
    to reuse), dropped again; an unchecked job after them reuses the unchecked twin's."""
    vision, projection = TINY_CHECKERS["vit-l14-scaled"]
    folder = save_safety_checker(tmp_path / "safety_checker", vision, projection)
    flag_images(folder, generated, [FLAGGED])
    unchecked = run_job(embedded, tiny_checkpoint)
    dropping = run_job(embedded, tiny_checkpoint, safety_checker=str(folder), on_flag="drop")
    twin = run_job(embedded, tiny_checkpoint, safety_checker=str(folder), on_flag="drop")
    again = run_job(embedded, tiny_checkpoint)
    engine = open_database(embedded.database_url)
    first, second = job_items(engine, dropping), job_items(engine, twin)
    assert [i.reused_from for i in first] == [None] * COUNT
    assert [i.safety_action for i in first] == ["dropped" if n == FLAGGED else "kept" for n in range(COUNT)]
    assert {i.safety_checker_sha256 for i in first} == {model_sha256(folder)}
    assert [i.reused_from for i in second] == [None if n == FLAGGED else first[n].id for n in range(COUNT)]
    safety = ("safety_flagged", "safety_scores", "safety_checker_sha256", "safety_action")
    assert [[getattr(i, c) for c in safety] for i in second] == [[getattr(i, c) for c in safety] for i in first]
    made = job_items(engine, unchecked)
    assert [i.reused_from for i in job_items(engine, again)] == [i.id for i in made]
    assert {i.safety_checker_sha256 for i in job_items(engine, again)} == {None}
