"""`sdq schedule` and `sdq scheduler`: stored prompt files, cron checks, and one job per
schedule per UTC day however many schedulers run, with the scheduler's clock driven by the
test (`--now`, or the `clock` of `DatabaseScheduler`) instead of waiting."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from sdq.db.models import Item, Job, Schedule, Status
from sdq.jobs.broker import create_app, queue_name
from sdq.worker.beat import DatabaseScheduler
from sdq.jobs.schedule import (
    Run,
    due_runs,
    first_run_on,
    next_run,
    parse_cron,
    run_schedule,
)
from sdq.jobs.submit import identify_model
from sdq.core.settings import Settings
from sdq.worker.factory import runner_from_settings
from tests.cli.conftest import Home, as_from_a_terminal
from tests.services import clear_queues, in_queue

UTC = timezone.utc
DAY1 = datetime(2031, 3, 4, tzinfo=UTC)
"""Fake days lie after the real time, so schedules added now (created_at) predate them."""


@pytest.fixture
def prompts(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("a red fox in the snow\na lighthouse at dusk\n")
    return path


def add(home: Home, prompts: Path, model: Path, *extra: str, name: str = "nightly",
        cron: str = "0 2 * * *"):
    return home.run("schedule", "add", name, "--cron", cron, str(prompts), "--model", str(model),
                    "--width", "64", "--height", "64", "--steps", "1", "--sampler", "euler",
                    *extra)


def listed(home: Home) -> list[dict]:
    result = home.run("schedule", "list", "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def jobs_of(home: Home) -> list[Job]:
    engine = home.engine
    with Session(engine) as session:
        found = list(session.scalars(select(Job).where(Job.schedule_id.is_not(None))
                                     .order_by(Job.run_day, Job.name)))
    engine.dispose()
    return found


def finished(home: Home) -> bool:
    """Whether some scheduled job exists and all its items are done."""
    engine = home.engine
    with Session(engine) as session:
        statuses = set(session.scalars(select(Item.status).join(Job)
                                       .where(Job.schedule_id.is_not(None))))
    engine.dispose()
    return statuses == {Status.DONE}


def test_add_list_run_now_remove(home: Home, prompts: Path, tiny_checkpoint: Path) -> None:
    result = add(home, prompts, tiny_checkpoint, "--tag", "nightly", "--seed", "7")
    assert result.exit_code == 0, result.output
    sha = hashlib.sha256(prompts.read_bytes()).hexdigest()
    assert "schedule nightly added" in result.output and sha[:12] in result.output
    [record] = listed(home)
    assert record["sha256"] == sha and record["enabled"] and record["last_job"] is None
    assert record["options"] == {"model": str(tiny_checkpoint.resolve()), "sampler": "euler",
                                 "steps": 1, "width": 64, "height": 64, "seed": 7,
                                 "tags": ["nightly"], "seed_policy": "same"}
    assert record["next_run"].endswith("T02:00:00+00:00")
    table = home.run("schedule", "list")
    assert "nightly" in table.output and sha[:12] in table.output and sha not in table.output

    result = home.run("schedule", "run-now", "nightly", "--json")
    assert result.exit_code == 0, result.output
    run = json.loads(result.output)
    today = datetime.now(UTC).date()
    assert run["created"] and run["items"] == 2 and run["day"] == today.isoformat()
    [job] = jobs_of(home)
    assert (job.id, job.name, job.run_day, job.tags) == (run["job"], f"nightly-{today}", today,
                                                         ["nightly"])
    assert job.source_sha256 == sha and job.defaults["seed"] == 7
    engine = home.engine
    with Session(engine) as session:
        items = session.scalars(select(Item).where(Item.job_id == job.id)
                                .order_by(Item.row_index)).all()
    engine.dispose()
    assert [(i.prompt, i.seed, i.status) for i in items] == [
        ("a red fox in the snow", 7, Status.DONE), ("a lighthouse at dusk", 8, Status.DONE)]

    again = home.run("schedule", "run-now", "nightly")
    assert again.exit_code == 1 and f"already ran on {today}: job {job.id}" in again.output
    assert len(jobs_of(home)) == 1
    assert listed(home)[0]["last_run"] == today.isoformat()
    assert listed(home)[0]["last_job"] == job.id

    disabled = home.run("schedule", "disable", "nightly")
    assert (disabled.exit_code, disabled.output) == (
        0, "schedule nightly disabled (`schedule add` with the same file enables it again)\n")
    assert not listed(home)[0]["enabled"] and listed(home)[0]["next_run"] is None
    readded = add(home, prompts, tiny_checkpoint, "--tag", "nightly", "--seed", "7")
    assert readded.exit_code == 0 and "re-enabled" in readded.output
    assert home.run("schedule", "disable", "nope").exit_code == 3

    removed = home.run("schedule", "remove", "nightly")
    assert (removed.exit_code, removed.output) == (
        0, "schedule nightly removed; its 1 job(s) stay, as jobs of no schedule\n")
    assert listed(home) == []
    with Session(home.engine) as session:
        kept = session.get(Job, job.id)
        assert (kept.name, kept.schedule_id, kept.run_day) == (f"nightly-{today}", None, None)
    assert home.run("schedule", "remove", "nope").exit_code == 3


def test_a_schedule_that_never_ran_is_deleted(home: Home, prompts: Path,
                                              tiny_checkpoint: Path) -> None:
    assert add(home, prompts, tiny_checkpoint).exit_code == 0
    result = home.run("schedule", "remove", "nightly")
    assert result.exit_code == 0 and "removed" in result.output
    assert listed(home) == []
    assert add(home, prompts, tiny_checkpoint).exit_code == 0
    result = home.run("schedule", "remove", "nightly", "--json")
    assert json.loads(result.output) == {"schedule": "nightly", "outcome": "removed", "jobs": 0}


@pytest.mark.parametrize("cron, reason", [
    ("0 2 * *", "expected 5 fields"),
    ("61 2 * * *", "61 > 59"),
    ("0 25 * * *", "25 > 23"),
    ("0 2 * * funday", "fun"),
    ("every night", "expected 5 fields"),
    ("0 2 31 2 *", "never fires"),
])
def test_a_bad_cron_is_refused_with_the_reason(home: Home, prompts: Path,
                                               tiny_checkpoint: Path, cron: str,
                                               reason: str) -> None:
    result = add(home, prompts, tiny_checkpoint, cron=cron)
    assert result.exit_code == 2 and reason in result.output and "--cron" in result.output
    assert listed(home) == []


def test_nan_options_are_refused(home: Home, prompts: Path, tiny_checkpoint: Path) -> None:
    result = add(home, prompts, tiny_checkpoint, "--cfg", "nan")
    assert result.exit_code == 2
    assert "Invalid value for '--cfg' / '--guidance-scale': expected a number, got 'nan'" in result.output
    result = add(home, prompts, tiny_checkpoint, "--eta", "0.5")
    assert result.exit_code == 2 and "Invalid value for '--eta': applies to ddim only" in result.output
    assert listed(home) == []


def test_a_bad_name_is_refused(home: Home, prompts: Path, tiny_checkpoint: Path) -> None:
    result = add(home, prompts, tiny_checkpoint, name="my schedule")
    assert result.exit_code == 2 and "'my schedule'" in result.output
    assert listed(home) == []


def test_a_bad_prompt_file_is_refused_like_submit(home: Home, tmp_path: Path,
                                                  tiny_checkpoint: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("prompt,seed,sampler\na fox,x,euler\n,1,eulr\n")
    result = add(home, bad, tiny_checkpoint)
    assert result.exit_code == 2
    assert f"{bad}:2: seed: expected a whole number, got 'x'" in result.output
    assert f"{bad}:3: prompt: missing" in result.output
    assert f"{bad}:3: sampler: unknown sampler 'eulr'" in result.output
    assert listed(home) == []
    good = tmp_path / "good.txt"
    good.write_text("a fox\n")
    missing = add(home, good, tmp_path / "no.safetensors")
    assert missing.exit_code == 3 and "--model" in missing.output and "no.safetensors" in missing.output
    assert listed(home) == []


def test_a_changed_file_is_visible_and_needs_replace(home: Home, prompts: Path,
                                                     tiny_checkpoint: Path) -> None:
    assert add(home, prompts, tiny_checkpoint).exit_code == 0
    old = hashlib.sha256(prompts.read_bytes()).hexdigest()
    same = add(home, prompts, tiny_checkpoint)
    assert same.exit_code == 0 and "unchanged" in same.output

    prompts.write_text("a red fox in the snow\na lighthouse at dawn\n")
    new = hashlib.sha256(prompts.read_bytes()).hexdigest()
    refused = add(home, prompts, tiny_checkpoint)
    assert refused.exit_code == 1
    assert f"prompt file sha256 {old[:12]} -> {new[:12]}" in refused.output
    assert "--replace" in refused.output
    assert listed(home)[0]["sha256"] == old

    replaced = add(home, prompts, tiny_checkpoint, "--replace")
    assert replaced.exit_code == 0
    assert f"replaced; prompt file changed {old[:12]} -> {new[:12]}" in replaced.output
    [record] = listed(home)
    assert record["sha256"] == new and record["sha"] == new[:12]

    other_cron = add(home, prompts, tiny_checkpoint, cron="30 3 * * *")
    assert other_cron.exit_code == 1 and "cron '0 2 * * *' -> '30 3 * * *'" in other_cron.output


def test_run_times_follow_the_cron_in_utc() -> None:
    weekdays_4am = parse_cron("15,45 4,9 * * mon-fri")
    assert first_run_on(weekdays_4am, date(2031, 3, 4)) == DAY1.replace(hour=4, minute=15)
    assert first_run_on(weekdays_4am, date(2031, 3, 8)) is None  # a Saturday
    assert next_run(weekdays_4am, datetime(2031, 3, 7, 5, tzinfo=UTC)) == \
        datetime(2031, 3, 10, 4, 15, tzinfo=UTC)
    leap = parse_cron("0 0 29 2 *")
    assert next_run(leap, DAY1) == datetime(2032, 2, 29, tzinfo=UTC)


def scheduler_process(home: Home, now: datetime) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", "from sdq.cli.main import cli; cli()", "scheduler", "--once", "--now", now.isoformat()],
        env={**os.environ, **home.env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)


def test_two_scheduler_processes_make_one_job_a_day(any_home: Home, prompts: Path,
                                                    tiny_checkpoint: Path) -> None:
    home = any_home
    assert add(home, prompts, tiny_checkpoint).exit_code == 0
    assert add(home, prompts, tiny_checkpoint, name="early", cron="30 0 * * *").exit_code == 0

    # 01:00: only `early` is due; both processes go for it at once.
    first = [scheduler_process(home, DAY1.replace(hour=1)) for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in first]
    assert [p.returncode for p in first] == [0, 0], outputs
    runs = [json.loads(line) for out, _ in outputs for line in out.splitlines()]
    assert {r["schedule"] for r in runs} == {"early"}
    assert sorted(r["created"] for r in runs) in ([True], [False, True]), outputs
    assert [(j.name, j.run_day) for j in jobs_of(home)] == [("early-2031-03-04", DAY1.date())]

    # 02:30, a restarted scheduler: `nightly` is due now; `early` ran today already.
    restarted = home.run("scheduler", "--once", "--now", "2031-03-04T02:30:00Z")
    assert restarted.exit_code == 0
    assert [json.loads(line)["schedule"] for line in restarted.stdout.splitlines()] == ["nightly"]
    assert [j.name for j in jobs_of(home)] == ["early-2031-03-04", "nightly-2031-03-04"]
    late = home.run("scheduler", "--once", "--now", "2031-03-04T23:59:59Z")
    assert late.exit_code == 0 and late.stdout == ""

    # Across midnight: nothing before the run times, then one job each for the new day.
    assert home.run("scheduler", "--once", "--now", "2031-03-05T00:00:05Z").stdout == ""
    assert home.run("scheduler", "--once", "--now", "2031-03-05T03:00:00Z").exit_code == 0
    assert [j.name for j in jobs_of(home)] == ["early-2031-03-04", "nightly-2031-03-04",
                                               "early-2031-03-05", "nightly-2031-03-05"]
    engine = home.engine
    with Session(engine) as session:
        statuses = set(session.scalars(select(Item.status)))
        days = set(session.scalars(select(Schedule.last_run_day)))
    engine.dispose()
    assert statuses == {Status.DONE} and days == {date(2031, 3, 5)}


def test_the_scheduler_service_runs_until_interrupted(home: Home, prompts: Path,
                                                      tiny_checkpoint: Path) -> None:
    """`sdq scheduler` as deployed (Celery beat's loop), its clock started 3 s before 02:00."""
    assert add(home, prompts, tiny_checkpoint).exit_code == 0
    process = subprocess.Popen(
        [sys.executable, "-c", "from sdq.cli.main import cli; cli()", "scheduler",
         "--max-interval", "1", "--now", "2031-03-04T01:59:57Z"],
        env={**os.environ, **home.env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, preexec_fn=as_from_a_terminal)
    try:
        deadline = time.monotonic() + 240
        while not finished(home) and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        time.sleep(3)  # more ticks, on a day that has its job
    finally:
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=300)  # a tick may be mid-generation
    assert process.returncode == 0, err
    assert "embedded" in err and "started job" in err
    assert [j.name for j in jobs_of(home)] == ["nightly-2031-03-04"]


def test_racing_runs_of_one_day_make_one_job(any_home: Home, prompts: Path,
                                             tiny_checkpoint: Path) -> None:
    """Three schedulers released at once, each with its own connections: the database lets
    one job through; the others report it."""
    assert add(any_home, prompts, tiny_checkpoint).exit_code == 0
    settings = Settings.load(any_home.env)
    start = threading.Barrier(3)

    def race(_: int) -> Run:
        start.wait()
        return run_schedule(settings, "nightly", DAY1.date(), make_runner=runner_from_settings)

    with ThreadPoolExecutor(3) as pool:
        runs = list(pool.map(race, range(3)))
    assert sorted(r.created for r in runs) == [False, False, True]
    assert len({r.job_id for r in runs}) == 1
    assert [j.name for j in jobs_of(any_home)] == ["nightly-2031-03-04"]


def test_the_beat_scheduler_follows_its_clock(home: Home, prompts: Path,
                                              tiny_checkpoint: Path) -> None:
    assert add(home, prompts, tiny_checkpoint).exit_code == 0
    settings = Settings.load(home.env)
    now = [DAY1.replace(hour=1, minute=59)]
    app = create_app(settings)
    beats = [DatabaseScheduler(app, settings=settings, clock=lambda: now[0], max_interval=60)
             for _ in range(2)]
    assert [beat.tick() for beat in beats] == [60.0, 60.0]  # asleep until 02:00, capped
    now[0] = DAY1.replace(hour=1, minute=59, second=50)
    assert beats[0].tick() == 10.0 and beats[0].last_runs == []
    now[0] = DAY1.replace(hour=2)
    for beat in beats:
        beat.tick()
    assert [[r.created for r in beat.last_runs] for beat in beats] == [[True], []]
    now[0] += timedelta(days=1)
    beats[1].tick()
    assert [j.name for j in jobs_of(home)] == ["nightly-2031-03-04", "nightly-2031-03-05"]


def test_the_beat_scheduler_enqueues_on_the_broker(home: Home, prompts: Path,
                                                   tiny_checkpoint: Path, redis_db: str) -> None:
    broker = redis_db
    sha = identify_model(tiny_checkpoint).sha256
    clear_queues(broker, queue_name(sha))
    try:
        assert add(home, prompts, tiny_checkpoint).exit_code == 0
        settings = Settings.load({**home.env, "SDQ_BROKER_URL": broker})
        beat = DatabaseScheduler(create_app(settings), settings=settings,
                                 clock=lambda: DAY1.replace(hour=2, minute=1))
        beat.tick()
        [run] = beat.last_runs
        [job] = jobs_of(home)
        assert run.created and job.status == Status.QUEUED
        assert in_queue(broker, queue_name(sha)) == 1
        beat.tick()
        assert beat.last_runs == [] and in_queue(broker, queue_name(sha)) == 1
    finally:
        clear_queues(broker, queue_name(sha))


def test_due_runs_skip_days_before_a_schedule_existed(home: Home, prompts: Path,
                                                      tiny_checkpoint: Path) -> None:
    assert add(home, prompts, tiny_checkpoint).exit_code == 0
    engine = home.engine
    with Session(engine) as session:
        [schedule] = session.scalars(select(Schedule)).all()
        created = schedule.created_at
        next_day_after_two = (created + timedelta(days=1)).replace(hour=3, minute=0)
        assert due_runs(session, next_day_after_two) != []
        assert due_runs(session, created - timedelta(days=1)) == []
    engine.dispose()
