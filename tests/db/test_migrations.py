"""Migrations: up, down and up again on both databases; no drift from the models."""
from __future__ import annotations

import threading
from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import inspect, text
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

SDQ_TABLES = {"models", "schedules", "jobs", "items", "init_images"}


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
    threads = [threading.Thread(target=first_use) for _ in range(6)]
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


def test_0004_adds_the_safety_columns_to_rows_already_there(empty_engine: Engine) -> None:
    """Existing jobs read as `on_flag = keep`, existing items as not checked; down and up
    again keep the rows (0004 only adds and drops columns)."""
    upgrade(empty_engine, "0003")
    with empty_engine.begin() as connection:
        connection.execute(text("INSERT INTO jobs (id, defaults, priority, tags, status, item_count, "
                                "created_at) VALUES (1, '{}', 0, '[]', 'done', 1, CURRENT_TIMESTAMP)"))
        connection.execute(text("INSERT INTO items (id, job_id, row_index, prompt, negative_prompt, seed, "
                                "sampler, steps, cfg, eta, width, height, status, attempts, created_at) "
                                "VALUES (1, 1, 0, 'a fox', '', 1, 'ddim', 50, 7.5, 0, 512, 512, 'done', 1, "
                                "CURRENT_TIMESTAMP)"))
    upgrade(empty_engine)
    query = text("SELECT jobs.on_flag, jobs.safety_checker, items.safety_flagged, items.safety_scores, "
                 "items.safety_checker_sha256, items.safety_action FROM items JOIN jobs ON jobs.id = items.job_id")
    with empty_engine.connect() as connection:
        assert tuple(connection.execute(query).one()) == ("keep", None, None, None, None, None)
    downgrade(empty_engine, "0003")
    columns = {column["name"] for column in inspect(empty_engine).get_columns("items")}
    assert not {c for c in columns if c.startswith("safety_")}
    with empty_engine.connect() as connection:
        assert connection.execute(text("SELECT prompt FROM items")).scalar() == "a fox"
    upgrade(empty_engine)


def test_0008_reads_rows_already_there_as_plain_prompts_without_adapters(
        empty_engine: Engine) -> None:
    """A 0007-era row reads its brackets literally (`plain`, clip skip 1, no adapters), as the
    image it made did; a row written after takes what it is given; down and up keep the rows."""
    upgrade(empty_engine, "0007")
    with empty_engine.begin() as connection:
        connection.execute(text("INSERT INTO jobs (id, defaults, priority, tags, status, item_count, "
                                "created_at) VALUES (1, '{}', 0, '[]', 'done', 2, CURRENT_TIMESTAMP)"))
        connection.execute(text("INSERT INTO items (id, job_id, row_index, prompt, negative_prompt, seed, "
                                "sampler, steps, cfg, eta, width, height, status, attempts, created_at) "
                                "VALUES (1, 1, 0, 'a (red:1.5) fox', '', 1, 'ddim', 50, 7.5, 0, 512, "
                                "512, 'done', 1, CURRENT_TIMESTAMP)"))
    upgrade(empty_engine, "0008")
    with empty_engine.begin() as connection:
        connection.execute(text(
            "INSERT INTO items (id, job_id, row_index, prompt, negative_prompt, seed, sampler, steps, "
            "cfg, eta, width, height, status, attempts, created_at, prompt_syntax, clip_skip, loras) "
            "VALUES (2, 1, 1, 'a fox', '', 1, 'ddim', 50, 7.5, 0, 512, 512, 'pending', 0, "
            "CURRENT_TIMESTAMP, 'a1111', 2, :loras)"),
            {"loras": '[{"name": "detail", "weight": 0.8, "sha256": "' + "a" * 64 + '"}]'})
        rows = connection.execute(text("SELECT id, prompt_syntax, clip_skip, loras, embeddings "
                                       "FROM items ORDER BY id")).all()
    assert tuple(rows[0]) == (1, "plain", 1, None, None)
    assert tuple(rows[1])[:3] == (2, "a1111", 2) and rows[1][3] is not None
    downgrade(empty_engine, "0007")
    columns = {column["name"] for column in inspect(empty_engine).get_columns("items")}
    assert not columns & {"prompt_syntax", "clip_skip", "loras", "embeddings"}
    upgrade(empty_engine)
    with empty_engine.connect() as connection:
        assert connection.execute(text("SELECT count(*) FROM items WHERE prompt_syntax = 'plain'"
                                       )).scalar() == 2
