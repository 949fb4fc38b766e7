"""Databases for the db tests: a real SQLite file and the real PostgreSQL server.

Every PostgreSQL database here is a schema of its own (named for the run, dropped after), put
first on the search path through the URL, so concurrent runs on one server never meet.
The server comes from SDQ_TEST_POSTGRESQL_URL (default: the CI service on 127.0.0.1:5432).
"""
from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy import delete
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import Session

from sdq.db.base import Base
from sdq.db.session import engine_from_url, upgrade

POSTGRESQL_URL = os.environ.get(
    "SDQ_TEST_POSTGRESQL_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
BACKENDS = ["sqlite", "postgresql"]


@contextmanager
def scratch_database(backend: str, folder: Path) -> Iterator[Engine]:
    """An empty database of `backend` that is gone afterwards."""
    if backend == "sqlite":
        engine = engine_from_url(f"sqlite:///{folder / 'sdq.db'}")
        yield engine
        engine.dispose()
        return
    schema = f"sdq_test_{uuid.uuid4().hex[:16]}"
    admin = engine_from_url(POSTGRESQL_URL)
    with admin.begin() as connection:
        connection.exec_driver_sql(f"CREATE SCHEMA {schema}")
    url = make_url(POSTGRESQL_URL).update_query_dict({"options": f"-csearch_path={schema}"})
    engine = engine_from_url(url)
    try:
        yield engine
    finally:
        engine.dispose()
        with admin.begin() as connection:
            connection.exec_driver_sql(f"DROP SCHEMA {schema} CASCADE")
        admin.dispose()


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
