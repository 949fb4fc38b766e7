"""Small builders shared by the db tests."""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Session

from sdq.db.models import Job, Schedule
from sdq.db.queries import submit_job


def spec(prompt: str = "a lighthouse at dusk", **fields: Any) -> dict[str, Any]:
    """One submittable item: the given fields over plain defaults."""
    return {"prompt": prompt, "seed": 1, "sampler": "euler", "steps": 20, "cfg": 7.5,
            "width": 512, "height": 512, **fields}


def add_job(session: Session, prompts: Iterable[str], **job_fields: Any) -> Job:
    """Submit one item per prompt (seed = position) and commit."""
    specs = [spec(prompt, seed=position) for position, prompt in enumerate(prompts)]
    job = submit_job(session, Job(**job_fields), specs)
    session.commit()
    return job


def add_job_as_of_0001(session: Session, prompts: list[str]) -> int:
    """A job and its items written with the columns of revision 0001 only, for tests that
    run older revisions (the ORM models are the newest revision's); returns the job's id."""
    job = session.execute(text(
        "INSERT INTO jobs (defaults, priority, tags, status, item_count, created_at) "
        "VALUES ('{}', 0, '[]', 'pending', :n, CURRENT_TIMESTAMP) RETURNING id"),
        {"n": len(prompts)}).scalar_one()
    for row, prompt in enumerate(prompts):
        session.execute(text(
            "INSERT INTO items (job_id, row_index, prompt, negative_prompt, seed, sampler, "
            "steps, cfg, eta, width, height, status, attempts, created_at) VALUES (:job, :row, "
            ":prompt, '', :row, 'euler', 20, 7.5, 0, 512, 512, 'pending', 0, CURRENT_TIMESTAMP)"),
            {"job": job, "row": row, "prompt": prompt})
    session.commit()
    return job


def add_schedule(session: Session, name: str = "nightly") -> Schedule:
    """A nightly schedule, flushed (so it has an id) but not committed."""
    schedule = Schedule(name=name, cron="0 2 * * *", prompt_file_name="p.csv",
                        prompt_text="prompt\na fox\n", prompt_sha256="0" * 64)
    session.add(schedule)
    session.flush()
    return schedule
