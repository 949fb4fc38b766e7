"""`sdq submit` with a broker that is down, misnamed or dies mid-submit: nothing recorded, or
the job recorded and named with the command that finishes it; never a job stranded silently,
never a second job from running the same command again."""
from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from sdq.db.models import Item, Job, Status
from sdq.jobs.broker import queue_name
from sdq.jobs.submit import NotEnqueued, identify_model, submit
from sdq.core.settings import Settings
from tests.faults import TcpProxy
from tests.services import REDIS_URL, clear_queues, in_queue

from .conftest import Home

SMALL = ["--width", "64", "--height", "64", "--steps", "1", "--sampler", "euler"]


def _jobs(home: Home) -> list[Job]:
    with Session(home.engine) as session:
        return list(session.scalars(select(Job)))


@pytest.fixture
def prompts(home: Home) -> Path:
    path = home.path / "prompts.txt"
    path.write_text("a red fox\na lighthouse\n")
    return path


@pytest.mark.parametrize("broker", ["refused", "db 99"])
def test_a_broker_that_cannot_be_reached_records_nothing(
        broker: str, home: Home, prompts: Path, tiny_checkpoint: Path, redis_db: str) -> None:
    with TcpProxy(("127.0.0.1", 6379)) as proxy:
        if broker == "refused":
            proxy.cut("refuse")
        url = proxy.url(f"{REDIS_URL}/{99 if broker == 'db 99' else 1}")
        home.env["SDQ_BROKER_URL"] = url
        for _ in range(2):  # running the same command again is just as harmless
            result = home.run("submit", str(prompts), "--model", str(tiny_checkpoint), *SMALL)
            assert result.exit_code == 4, result.output
            assert "cannot reach the broker at redis://127.0.0.1:" in result.output
            assert "nothing was submitted" in result.output
    assert _jobs(home) == []


def test_a_broker_url_without_scheme_is_bad_input(home: Home, prompts: Path,
                                                  tiny_checkpoint: Path) -> None:
    home.env["SDQ_BROKER_URL"] = "127.0.0.1:6379/0"
    result = home.run("submit", str(prompts), "--model", str(tiny_checkpoint), *SMALL)
    assert result.exit_code == 2, result.output
    assert "SDQ_BROKER_URL: '127.0.0.1:6379/0' has no scheme; expected redis://" in result.output


def test_a_broker_lost_after_recording_names_the_job_and_resume_finishes_it(
        home: Home, prompts: Path, tiny_checkpoint: Path, redis_db: str) -> None:
    model = identify_model(tiny_checkpoint)
    clear_queues(redis_db, queue_name(model.sha256))
    with TcpProxy(("127.0.0.1", 6379)) as proxy:
        settings = Settings.load({**home.env, "SDQ_BROKER_URL": proxy.url(redis_db)})
        specs = [{"prompt": "a fox", "seed": 1, "sampler": "euler", "steps": 1, "cfg": 7.0,
                  "width": 64, "height": 64}]
        with pytest.raises(NotEnqueued) as raised:
            submit(settings, specs, model=model,
                   on_submitted=lambda *_: proxy.cut("refuse"))
        [job] = _jobs(home)
        assert str(raised.value).startswith(f"job {job.id} was recorded but not enqueued (broker: ")
        assert f"`sdq resume {job.id}` enqueues it" in str(raised.value)
        proxy.restore()
        home.env["SDQ_BROKER_URL"] = proxy.url(redis_db)
        result = home.run("resume", str(job.id))
        assert result.exit_code == 0, result.output
    assert in_queue(redis_db, queue_name(model.sha256)) == 1
    with Session(home.engine) as session:
        assert session.scalar(select(func.count()).where(Item.status == Status.QUEUED)) == 1
    clear_queues(redis_db, queue_name(model.sha256))
