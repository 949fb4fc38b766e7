"""Ids that land in provenance are never handed out twice (migration 0005): after a purge, a
new job gets new job and item ids on SQLite as on PostgreSQL, and the rebuild keeps every row,
index, trigger and the full-text index of an existing database."""
from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session
from sqlite_utils import Database

from sdq.db.models import Item, Job
from sdq.db.queries import search_items
from sdq.db.session import downgrade, upgrade
from sdq.images.storage import LocalStorage
from sdq.jobs.maintenance import purge_job
from tests.services import scratch_database

from .helpers import add_job, add_job_as_of_0001


def ids(session: Session, job: Job) -> tuple[int, list[int]]:
    return job.id, list(session.scalars(select(Item.id).where(Item.job_id == job.id).order_by(Item.id)))


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_purged_jobs_ids_are_never_given_again(backend: str, tmp_path: Path) -> None:
    with scratch_database(backend, tmp_path) as engine:
        upgrade(engine)
        with Session(engine, expire_on_commit=False) as session:
            kept = ids(session, add_job(session, ["a red fox"]))
            purged = ids(session, add_job(session, ["a lighthouse", "a boat"]))
        purge_job(engine, LocalStorage(tmp_path / "images"), purged[0])
        with Session(engine) as session:
            job_id, item_ids = ids(session, add_job(session, ["a kite", "a tree"]))
        assert job_id > purged[0] and min(item_ids) > max(purged[1]) > max(kept[1])


def test_the_rebuild_keeps_rows_foreign_keys_and_full_text_search(tmp_path: Path) -> None:
    with scratch_database("sqlite", tmp_path) as engine:
        upgrade(engine, "0004")
        with Session(engine, expire_on_commit=False) as session:
            job_id = add_job_as_of_0001(session, ["a red fox", "a lighthouse"])
            first = job_id, list(session.scalars(select(Item.id).where(Item.job_id == job_id)
                                                 .order_by(Item.id)))
            add_job_as_of_0001(session, ["a fox cub"])
        upgrade(engine)
        with Session(engine) as session:
            assert ids(session, session.get(Job, first[0])) == first  # no cascade on the rebuild
            add_job(session, ["a fox in the snow"])  # indexed by the recreated triggers
            found = [i.prompt for i in search_items(session, text="fox", limit=10).items]
            assert found == ["a fox in the snow", "a fox cub", "a red fox"]
        database = Database(tmp_path / "sdq.db")
        assert database["items"].detect_fts() == "items_fts"
        assert "AUTOINCREMENT" in database["items"].schema and "AUTOINCREMENT" in database["jobs"].schema
        assert {i.name for i in database["items"].indexes} >= {
            "ix_items_image_key", "ix_items_status_lease_expires_at", "ix_items_seed"}
        with engine.connect() as connection:
            assert connection.exec_driver_sql("PRAGMA foreign_key_check").all() == []
            assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        downgrade(engine, "0003")
        assert "AUTOINCREMENT" not in Database(tmp_path / "sdq.db")["items"].schema
        upgrade(engine)
        with Session(engine) as session:
            assert len(search_items(session, text="fox", limit=10).items) == 3
