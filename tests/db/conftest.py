"""Databases for the db tests: a real SQLite file and the real PostgreSQL server, each a
scratch database of `tests.services` that is gone after the test."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import delete
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from sdq.db.base import Base
from sdq.db.session import upgrade
from tests.services import scratch_database

BACKENDS = ["sqlite", "postgresql"]


@pytest.fixture(params=BACKENDS)
def empty_engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """A database with nothing in it, for migration tests."""
    with scratch_database(request.param, tmp_path) as engine:
        yield engine


@pytest.fixture(scope="session", params=BACKENDS)
def migrated_engine(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Engine]:
    """A database at the newest revision, shared by the tests of one backend."""
    with scratch_database(request.param, tmp_path_factory.mktemp("db")) as engine:
        upgrade(engine)
        yield engine


@pytest.fixture
def session(migrated_engine: Engine) -> Iterator[Session]:
    """A session on the shared database, emptied after the test whatever it committed."""
    with Session(migrated_engine) as session:
        yield session
    with migrated_engine.begin() as connection:
        for table in reversed(Base.metadata.sorted_tables):
            connection.execute(delete(table))
