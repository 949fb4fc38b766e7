"""Job progress, failure summaries, the model registry and tag search, on both databases."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from sdq.db.models import Item, Job, Model, Status
from sdq.db.queries import (
    failure_reasons,
    find_model,
    job_progress,
    recent_jobs,
    register_model,
    remove_model,
    search_items,
    submit_job,
)

from .helpers import add_job, spec

T0 = datetime(2025, 1, 1, tzinfo=timezone.utc)


def set_items(session: Session, job: Job, rows: list[int], **values: object) -> None:
    session.execute(update(Item).where(Item.job_id == job.id, Item.row_index.in_(rows))
                    .values(**values))
    session.commit()


def test_progress_rate_and_eta(session: Session) -> None:
    job = add_job(session, [f"p{n}" for n in range(6)])
    empty = job_progress(session, job.id)
    assert empty.remaining == 6 and empty.images_per_s is None and empty.eta_s is None
    set_items(session, job, [0, 1], status=Status.DONE, started_at=T0,
              finished_at=T0 + timedelta(seconds=4))
    set_items(session, job, [2], status=Status.RUNNING)
    progress = job_progress(session, job.id, now=T0 + timedelta(seconds=10))
    assert progress.counts[Status.DONE] == 2 and progress.remaining == 4
    assert progress.images_per_s == 0.5 and progress.eta_s == 8.0
    # Nothing finished for 2 minutes at 0.5 images/s (40 s of 20 images' worth): stalled.
    stalled = job_progress(session, job.id, now=T0 + timedelta(seconds=125))
    assert (stalled.stalled_s, stalled.eta_s) == (121.0, None)
    set_items(session, job, [2, 3, 4, 5], status=Status.CANCELLED)
    assert job_progress(session, job.id).eta_s == 0.0


def test_failures_are_grouped_by_error(session: Session) -> None:
    job = add_job(session, [f"p{n}" for n in range(5)])
    set_items(session, job, [1, 3], status=Status.FAILED, last_error="out of memory")
    set_items(session, job, [4], status=Status.FAILED)
    first = session.scalar(select(Item.id).where(Item.job_id == job.id, Item.row_index == 1))
    assert failure_reasons(session, job.id) == [("out of memory", 2, first), ("", 1, first + 3)]


def test_recent_jobs_newest_first_with_counts(session: Session) -> None:
    old = add_job(session, ["a", "b"])
    new = add_job(session, ["c"])
    set_items(session, old, [0], status=Status.DONE)
    listed = recent_jobs(session, limit=5)
    assert [job.id for job, _ in listed] == [new.id, old.id]
    assert listed[1][1][Status.DONE] == 1 and listed[1][1][Status.PENDING] == 1
    assert [job.id for job, _ in recent_jobs(session, limit=1)] == [new.id]


def test_model_registry(session: Session) -> None:
    sd15 = register_model(session, sha256="a1" * 32, name="sd15", source_uri="/m/a")
    register_model(session, sha256="a2" * 32, name="other", source_uri="/m/b")
    assert find_model(session, "sd15") is sd15 and find_model(session, "A1A1A1") is sd15
    assert find_model(session, "a1a1a") is None  # too short to be a hash
    twin = register_model(session, sha256="a1a1a1" + "bc" * 29, name="twin", source_uri="/m/t")
    with pytest.raises(LookupError, match="more than one model"):
        find_model(session, "a1a1a1")
    assert find_model(session, "a1a1a1b") is twin
    remove_model(session, "twin")
    renamed = register_model(session, sha256="a1" * 32, name="sd15-ema", source_uri="/m/c")
    assert renamed is sd15 and sd15.name == "sd15-ema" and sd15.source_uri == "/m/c"
    with pytest.raises(ValueError, match="the name 'other' is taken by model a2a2a2a2a2"):
        register_model(session, sha256="a1" * 32, name="other", source_uri="/m/a")
    submit_job(session, Job(), [spec(model_id=sd15.id)])
    with pytest.raises(ValueError, match=r"\(a1a1a1a1a1\) is recorded with 1 item"):
        remove_model(session, "sd15-ema")
    assert remove_model(session, "other").sha256 == "a2" * 32
    with pytest.raises(LookupError, match="no model named 'other'"):
        remove_model(session, "other")
    session.commit()
    assert session.scalars(select(Model.name)).all() == ["sd15-ema"]


def test_search_by_item_or_job_tag(session: Session) -> None:
    submit_job(session, Job(tags=["nightly"]), [spec("a"), spec("b", tags=["x"])])
    submit_job(session, Job(), [spec("c", tags=["nightly", "y"]), spec("d", tags=["nightlyx"])])
    session.commit()

    def prompts(tag: str) -> list[str]:
        return [item.prompt for item in search_items(session, tag=tag).items]

    assert prompts("nightly") == ["c", "b", "a"]
    assert prompts("x") == ["b"] and prompts("nope") == []
