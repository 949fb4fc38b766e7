"""Small builders shared by the db tests."""
from __future__ import annotations

from typing import Any, Iterable

from sqlalchemy.orm import Session

from sdq.db.models import Job
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
