"""Migrations: up, down and up again on both databases; no drift from the models."""
from __future__ import annotations

import threading
from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import inspect
from sqlalchemy.engine import Engine

from sdq.db.models import Item
from sdq.db.session import (
    HEAD_REVISION,
    SchemaMismatch,
    alembic_config,
    current_revision,
    downgrade,
    head_revision,
    open_database,
    upgrade,
)
from tests.services import scratch_database

SDQ_TABLES = {"models", "schedules", "jobs", "items"}


def tables(engine: Engine) -> set[str]:
    return set(inspect(engine).get_table_names())


def test_the_head_revision_constant_is_the_newest_script() -> None:
    """Databases at HEAD_REVISION open without Alembic; a new migration must move it."""
    assert HEAD_REVISION == head_revision()


def test_upgrade_downgrade_upgrade(empty_engine: Engine) -> None:
    upgrade(empty_engine)
    assert current_revision(empty_engine) == head_revision()
    assert SDQ_TABLES <= tables(empty_engine)

    downgrade(empty_engine, "base")
    assert current_revision(empty_engine) is None
    assert tables(empty_engine) == {"alembic_version"}  # the FTS5 tables went too

    upgrade(empty_engine)
    assert current_revision(empty_engine) == head_revision()


def test_models_and_migrations_agree(empty_engine: Engine) -> None:
    """`alembic check`: autogenerate finds nothing to do at head (raises on any drift)."""
    upgrade(empty_engine)
    with empty_engine.connect() as connection:
        command.check(alembic_config(connection))


def test_partial_and_brin_indexes_match_the_models(empty_engine: Engine) -> None:
    """What `alembic check` cannot see: which indexes are partial, and which are BRIN."""
    upgrade(empty_engine)
    dialect = empty_engine.dialect.name
    reflected = {index["name"]: index for index in inspect(empty_engine).get_indexes("items")}
    for index in Item.__table__.indexes:
        options = reflected[index.name].get("dialect_options", {})
        assert (options.get(f"{dialect}_where") is None) == (
            index.dialect_options[dialect]["where"] is None
        ), index.name
        if dialect == "postgresql":
            assert options.get("postgresql_using", "btree") == (
                index.dialect_options["postgresql"]["using"] or "btree"
            ), index.name


def test_sqlite_connections_use_wal_and_foreign_keys(tmp_path: Path) -> None:
    with scratch_database("sqlite", tmp_path) as engine, engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1


def test_embedded_database_is_created_and_upgraded_on_first_use(tmp_path: Path) -> None:
    path = tmp_path / "home" / "not-yet" / "sdq.db"
    engines = []
    errors: list[BaseException] = []

    def first_use() -> None:
        try:
            engines.append(open_database(f"sqlite:///{path}"))
        except BaseException as exc:  # collected and re-raised in the test's thread
            errors.append(exc)

    # Two processes' first use at once: the migration lock makes one wait for the other.
    threads = [threading.Thread(target=first_use) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert path.is_file()
    for engine in engines:
        assert current_revision(engine) == head_revision()
        engine.dispose()


def test_server_database_is_checked_not_upgraded(tmp_path: Path) -> None:
    with scratch_database("postgresql", tmp_path) as engine:
        with pytest.raises(SchemaMismatch, match="run `sdq db upgrade`"):
            open_database(engine.url)
        assert current_revision(engine) is None
        upgrade(engine)
        open_database(engine.url).dispose()


def test_unknown_urls_are_refused() -> None:
    from sdq.db.session import engine_from_url

    with pytest.raises(ValueError, match="unsupported database 'mysql'"):
        engine_from_url("mysql://user:secret@host/db")
    with pytest.raises(ValueError, match="not a database URL") as error:
        engine_from_url("user:secret@host")
    assert "secret" not in str(error.value)
