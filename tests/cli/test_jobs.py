"""`sdq jobs` and `sdq status` over real rows, on SQLite and PostgreSQL."""
from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from sqlalchemy.orm import Session

from sdq.db.models import Job, Status
from tests.services import claimed_redis_db

from .conftest import Home


def test_jobs_lists_the_newest_first_with_counts(any_home: Home) -> None:
    first = any_home.add_job(["a", "b", "c"], done=2, name="first")
    second = any_home.add_job(["d"], failed={0: "CUDA out of memory"}, source_name="p.csv")
    table = any_home.run("jobs")
    assert table.exit_code == 0, table.output
    lines = table.output.splitlines()
    assert lines[0].split() == ["id", "name", "status", "items", "done", "failed", "flagged", "created"]
    assert lines[1].split()[:6] == [str(second.id), "p.csv", "pending", "1", "0", "1"]
    assert lines[2].split()[:6] == [str(first.id), "first", "pending", "3", "2", "0"]
    records = json.loads(any_home.run("jobs", "--json", "--limit", "1").output)
    assert [r["id"] for r in records] == [second.id] and records[0]["failed"] == 1
    csv_lines = any_home.run("jobs", "--csv").output.splitlines()
    assert csv_lines[0].startswith("id,name,status,items,done,failed,flagged,created")
    assert len(csv_lines) == 3


def test_jobs_on_an_empty_database_says_how_to_start(home: Home) -> None:
    result = home.run("jobs")
    assert result.exit_code == 0 and "no jobs yet" in result.stderr


def test_status_counts_rate_eta_and_failures(any_home: Home) -> None:
    job = any_home.add_job([f"p{n}" for n in range(8)], done=4,
                           failed={5: "CUDA out of memory", 6: "CUDA out of memory", 7: "bad"})
    result = any_home.run("status", str(job.id))
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == f"Job {job.id} (unnamed): pending, 4/8 done"
    assert lines[1] == "  pending 1  done 4  failed 3"
    # 4 images from the first start (t=0) to the last finish (t=4 s): 1/s, 1 left; but the
    # last one finished long ago, so the job is stalled and no time left is claimed.
    assert lines[2].startswith("  1.00 images/s, none finished for ")
    assert lines[2].endswith(": stalled, time left unknown (`sdq workers` shows who is working)")
    report = json.loads(any_home.run("status", str(job.id), "--json").output)
    assert report["counts"]["failed"] == 3 and report["eta_s"] is None
    assert report["stalled_s"] > 3600
    assert report["failures"][0]["error"] == "CUDA out of memory"
    assert report["failures"][0]["items"] == 2
    assert lines[3].startswith("  failed x2 (first: item ") and lines[3].endswith(
        "): CUDA out of memory")
    assert lines[4].endswith(": bad")


def test_status_of_a_job_with_nothing_done_and_of_no_job(home: Home) -> None:
    job = home.add_job(["a"])
    assert "no images finished yet, time left unknown" in home.run("status", str(job.id)).output
    missing = home.run("status", "999")
    assert missing.exit_code == 3 and missing.output == "Error: no job 999\n"
    assert home.run("status", "x").exit_code == 2


def test_an_unreachable_database_is_one_line_without_the_password(home: Home) -> None:
    home.env["SDQ_DATABASE_URL"] = "postgresql://sdq:hunter2@127.0.0.1:1/sdq"
    result = home.run("jobs")
    assert result.exit_code == 4 and "hunter2" not in result.output
    assert result.output.startswith("Error: postgresql://sdq:***@127.0.0.1:1/sdq: connection")
    assert len(result.output.splitlines()) == 1


def test_retry_without_a_broker_says_it_ran_here_and_fails_when_they_fail_again(home: Home
                                                                                 ) -> None:
    job = home.add_job(["a red fox", "a boat"], done=1, failed={1: "boom"})  # /m/tiny is gone
    result = home.run("retry", str(job.id))
    assert result.exit_code == 1, result.output
    assert result.stdout.splitlines()[-1] == (
        f"Job {job.id}: 1 failed item(s) run again here (no broker): 0 done, 1 failed "
        f"(`sdq status {job.id}` says why)")
    assert "re-enqueued" not in result.output
    record = json.loads(home.run("retry", str(job.id), "--json").stdout)
    assert record == {"job": job.id, "items": 1, "batches": 1, "done": 0, "failed": 1}


@pytest.fixture(params=["embedded", "distributed"])
def either_mode(request: pytest.FixtureRequest, home: Home) -> Iterator[Home]:
    """The embedded default, or the same home with a (real) broker configured."""
    if request.param == "embedded":
        yield home
        return
    with claimed_redis_db() as broker_url:
        home.env["SDQ_BROKER_URL"] = broker_url
        yield home


def job_status(home: Home, job_id: int) -> Status:
    with Session(home.engine) as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job.status


def test_retry_of_a_job_without_failed_items_changes_nothing(either_mode: Home) -> None:
    job = either_mode.add_job(["a red fox", "a boat"], done=2, status=Status.DONE)
    result = either_mode.run("retry", str(job.id))
    assert (result.exit_code, result.stdout) == (
        0, f"Job {job.id} has no failed items; nothing to retry\n")
    assert job_status(either_mode, job.id) == Status.DONE
    record = json.loads(either_mode.run("retry", str(job.id), "--json").stdout)
    assert record == {"job": job.id, "items": 0, "batches": 0}
    assert job_status(either_mode, job.id) == Status.DONE


def test_resume_closes_a_job_left_queued_with_nothing_to_run(either_mode: Home) -> None:
    """What `retry` of a job without failed items used to leave: queued, every item done."""
    job = either_mode.add_job(["a red fox", "a boat"], done=2, status=Status.QUEUED)
    result = either_mode.run("resume", str(job.id))
    assert (result.exit_code, result.stdout) == (0, f"nothing to resume. Job {job.id}: 2/2 done\n")
    assert job_status(either_mode, job.id) == Status.DONE


def test_status_of_a_job_whose_checker_did_not_load_says_so(home: Home) -> None:
    reason = "safety checker: /m/checker: no such safety checker folder, nor a Hugging Face repo id"
    job = home.add_job(["a red fox", "a boat"], failed={0: reason, 1: reason},
                       safety_checker="/m/checker", on_flag="drop")
    result = home.run("status", str(job.id))
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert "  safety checker: failed to load, 2 item(s) failed unchecked (on flag: drop)" in lines
    assert not any("0 flagged" in line for line in lines)
    record = json.loads(home.run("status", str(job.id), "--json").output)
    assert (record["flagged"], record["checker_failed"]) == (0, 2)
