"""`sdq purge`: a job's rows and images go, after a confirmation; other jobs stay."""
from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from sdq.db.base import utcnow
from sdq.db.models import Item, Job, Status
from sdq.images.storage import LocalStorage, Storage, open_storage
from sdq.jobs.maintenance import JobBusy, purge_job

from .conftest import Home


@pytest.fixture(params=["folder", "s3"])
def store_home(request: pytest.FixtureRequest, home: Home, monkeypatch: pytest.MonkeyPatch) -> Home:
    """The embedded home with its images in the local folder, or in a bucket on the S3 test
    server (the endpoint in this process's environment, for the test's own reads too)."""
    if request.param == "s3":
        name = request.getfixturevalue("bucket")
        monkeypatch.setenv("AWS_ENDPOINT_URL", request.getfixturevalue("s3_server").endpoint)
        home.env["SDQ_STORAGE_URL"] = f"s3://{name}/images"
    return home


def storage_of(home: Home) -> Storage:
    return open_storage(home.env.get("SDQ_STORAGE_URL") or str(home.path / "home" / "images"))


def counts(home: Home, job_id: int) -> tuple[int, int]:
    with Session(home.engine) as session:
        return (session.scalar(select(func.count()).where(Job.id == job_id)),
                session.scalar(select(func.count()).where(Item.job_id == job_id)))


def test_purge_asks_then_deletes_rows_and_images(store_home: Home) -> None:
    home = store_home
    doomed = home.add_job(["a red fox", "a lighthouse", "a castle"], done=2, name="doomed")
    kept = home.add_job(["a boat"], done=1)
    storage = storage_of(home)
    storage.put(f"{doomed.id}/999.png", b"an unrecorded leftover")

    refused = home.run("purge", str(doomed.id), input="n\n")
    assert refused.exit_code == 1
    assert f"Delete job {doomed.id} (doomed): 3 item(s) and 2 stored image(s)?" in refused.output
    assert counts(home, doomed.id) == (1, 3) and len(list(storage.list(f"{doomed.id}/"))) == 3

    result = home.run("purge", str(doomed.id), input="y\n")
    assert result.exit_code == 0, result.output
    assert result.output.endswith(f"Job {doomed.id} purged: 3 item(s) and 3 image(s) deleted\n")
    assert counts(home, doomed.id) == (0, 0)
    with Session(home.engine) as session:
        kept_item = session.scalars(select(Item).where(Item.job_id == kept.id)).one()
    assert list(storage.list()) == [kept_item.image_key]
    assert home.run("search", "fox").output == "no items match\n"  # the prompt index too
    assert home.run("purge", str(doomed.id), "--yes").output == f"Error: no job {doomed.id}\n"


def test_purge_is_refused_while_items_run(home: Home) -> None:
    job = home.add_job(["a red fox", "a lighthouse"], done=1)
    with Session(home.engine) as session, session.begin():
        lease = utcnow() + timedelta(minutes=2)
        session.execute(update(Item).where(Item.job_id == job.id, Item.status == Status.PENDING)
                        .values(status=Status.RUNNING, lease_expires_at=lease))
    result = home.run("purge", str(job.id), "--yes")
    assert result.exit_code == 1
    assert result.output == (f"Error: job {job.id} has 1 item(s) running; cancel it (`sdq cancel "
                             f"{job.id}`) and purge once they finish\n")
    assert counts(home, job.id) == (1, 2) and len(list(storage_of(home).list())) == 1


def test_purge_json_on_both_databases(any_home: Home) -> None:
    job = any_home.add_job(["a red fox", "a lighthouse"], done=1)
    result = any_home.run("purge", str(job.id), "--yes", "--json")
    assert result.output == f'{{"job_id": {job.id}, "items": 2, "images": 1, "kept": 0, "inits": 0}}\n'
    assert counts(any_home, job.id) == (0, 0)


class ClaimDuringDelete(LocalStorage):
    """A store whose first delete lets a worker claim the job's queued items, as a worker
    taking its next message in the middle of a purge would."""

    def __init__(self, root: Path, home: Home, job_id: int) -> None:
        super().__init__(root)
        self.home, self.job_id, self.claimed = home, job_id, 0

    def delete(self, key: str) -> None:
        if not self.claimed:
            with Session(self.home.engine) as session, session.begin():
                self.claimed = session.execute(
                    update(Item).where(Item.job_id == self.job_id, Item.status == Status.PENDING)
                    .values(status=Status.RUNNING, lease_expires_at=utcnow() + timedelta(minutes=2))
                ).rowcount or -1
        super().delete(key)


def test_a_worker_claiming_during_a_purge_never_keeps_done_rows_without_images(home: Home) -> None:
    job = home.add_job(["a red fox", "a lighthouse", "a castle"], done=2)
    storage = ClaimDuringDelete(home.path / "home" / "images", home, job.id)
    try:
        purge_job(home.engine, storage, job.id)
    except JobBusy:
        pass
    with Session(home.engine) as session:
        done = session.scalars(select(Item.image_key).where(
            Item.job_id == job.id, Item.status == Status.DONE)).all()
    assert [key for key in done if not storage.exists(key)] == []
    assert storage.claimed == -1 and counts(home, job.id) == (0, 0)
