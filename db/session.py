"""Engines for sdq databases, and the schema migrations that go with them.

One URL picks the database: `sqlite:///path` (the embedded default) or `postgresql://...`
(served through psycopg 3). Nothing here reads settings; callers pass the URL. Alembic is
loaded only to migrate or to judge a database that is not at `HEAD_REVISION`: opening a
current one, which every command does, costs one query.
"""
from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import URL, Connection, Engine, make_url

from sdq.core.errors import InvalidInput, Unavailable
from sdq.core.settings import mask_url

if TYPE_CHECKING:
    from alembic.config import Config

HEAD_REVISION = "0009"
"""The newest migration under migrations/versions (a test keeps them equal)."""

SQLITE_BUSY_TIMEOUT_S = 30.0
"""How long a SQLite writer waits for another's lock before giving up: long enough to ride
out a bulk submit in the embedded mode's other process."""


_URL_FORMS = "expected sqlite:///PATH or postgresql://USER@HOST/DBNAME"


class SchemaMismatch(Unavailable):
    """The database's schema revision is not the one this version of sdq works with."""


def engine_from_url(url: str | URL, **kwargs: Any) -> Engine:
    """Create an engine for `url`, set up for sdq's use of that database; no schema change.

    `postgresql://` and `postgres://` URLs get the psycopg 3 driver. For a SQLite file the
    folder is created, and every connection uses WAL (readers never block the writer), enforced
    foreign keys, a busy timeout, and transactions that SQLAlchemy begins itself, so DDL and
    SAVEPOINTs are transactional (pysqlite's own handling would commit around them).
    """
    try:
        url = make_url(url)
    except sa.exc.ArgumentError:
        raise InvalidInput(f"not a database URL; {_URL_FORMS}") from None
    if url.drivername in ("postgresql", "postgres"):
        url = url.set(drivername="postgresql+psycopg")
    backend = url.get_backend_name()
    if backend == "postgresql":
        return sa.create_engine(url, pool_pre_ping=True, **kwargs)
    if backend != "sqlite":
        raise InvalidInput(f"unsupported database {url.drivername!r}; {_URL_FORMS}")
    if url.database and url.database != ":memory:" and not url.database.startswith("file:"):
        Path(url.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = sa.create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S}, **kwargs)
    sa.event.listen(engine, "connect", _sqlite_connect)
    sa.event.listen(engine, "begin", _sqlite_begin)
    return engine


def _sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    dbapi_connection.isolation_level = None  # the "begin" listener below starts transactions
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    # In WAL mode NORMAL cannot corrupt the file; a power cut may lose the last commits, which
    # the queue already tolerates (at-least-once delivery, idempotent completion).
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _sqlite_begin(connection: Connection) -> None:
    # Every transaction takes the write lock up front (IMMEDIATE) unless it is marked
    # read-only (`read_only`). A deferred transaction that reads and then writes fails at
    # once with "database is locked" when another process committed in between (its snapshot
    # is stale; the busy timeout does not apply), which is how several embedded runs on one
    # file used to kill each other. Immediate ones queue on the busy timeout instead; they
    # are short, so the wait is too.
    immediate = connection.get_execution_options().get("sqlite_immediate", True)
    connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def read_only(engine: Engine) -> Engine:
    """`engine` for long reads (exports): on SQLite they take no write lock, so runs writing
    meanwhile are not held up (WAL readers never block writers). Never write through it."""
    return engine.execution_options(sqlite_immediate=False)


def alembic_config(connection: Connection | None = None) -> Config:
    """Alembic configured in code: the scripts ship inside the package, no alembic.ini."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(files("sdq.migrations")))
    config.attributes["connection"] = connection
    return config


def _migrate(engine: Engine, action: str, revision: str) -> None:
    from alembic import command

    with engine.connect() as connection:
        sqlite = engine.dialect.name == "sqlite"
        if sqlite:
            # A table rebuild (revision 0005) drops the old table: with foreign keys enforced,
            # dropping `jobs` would delete every item (ON DELETE CASCADE). SQLite only changes
            # this setting outside a transaction; the keys are checked before committing.
            _pragma(connection, "PRAGMA foreign_keys=OFF")
        try:
            with connection.begin():
                getattr(command, action)(alembic_config(connection), revision)
                if sqlite and connection.exec_driver_sql("PRAGMA foreign_key_check").first():
                    raise RuntimeError(f"{action} to {revision} would break foreign keys")
        finally:
            if sqlite:
                _pragma(connection, "PRAGMA foreign_keys=ON")


def _pragma(connection: Connection, statement: str) -> None:
    """Run `statement` on the driver's connection directly, outside any transaction."""
    connection.connection.driver_connection.execute(statement)  # type: ignore[union-attr]


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Upgrade the schema to `revision`, all in one transaction."""
    _migrate(engine, "upgrade", revision)


def downgrade(engine: Engine, revision: str) -> None:
    """Downgrade the schema to `revision` ("base" removes every sdq table)."""
    _migrate(engine, "downgrade", revision)


def current_revision(engine: Engine) -> str | None:
    """The database's schema revision; None for a database sdq has never touched."""
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def head_revision() -> str:
    """The newest schema revision this version of sdq knows, read from the scripts."""
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None, "sdq ships at least one migration"
    return head


def open_database(url: str | URL) -> Engine:
    """The engine the CLI and the workers use: ready for queries, or a clear error.

    A SQLite database is the embedded mode's private file, so it is created and upgraded here
    on first use. A server database is shared by every worker; upgrading it is an operator's
    step (`sdq db upgrade`), so here it is only checked.
    """
    engine = engine_from_url(url)
    with _first_use_lock(engine):
        return _checked(engine)


def _checked(engine: Engine) -> Engine:
    if _stamped_revision(engine) == HEAD_REVISION:
        return engine
    current, head = current_revision(engine), head_revision()
    if current == head:
        return engine
    if engine.dialect.name == "sqlite" and current in _known_revisions():
        upgrade(engine)
        return engine
    shown = mask_url(engine.url.render_as_string(hide_password=False))
    engine.dispose()
    if current is not None and current not in _known_revisions():
        raise SchemaMismatch(
            f"{shown} is at schema revision {current}, newer than this sdq knows ({head}):"
            " upgrade sdq"
        )
    raise SchemaMismatch(
        f"{shown} is at schema revision {current or 'none'}, sdq needs {head}:"
        " run `sdq db upgrade`"
    )


@contextmanager
def _first_use_lock(engine: Engine) -> Iterator[None]:
    """Held while an embedded database is checked (and created or upgraded): an exclusive
    lock on its folder, so two processes opening a new file at once take turns, the second
    finding it at head. Without it, one's connection set-up (the switch to WAL) could meet the
    other's migration and fail with "database is locked" instead of waiting. A server database
    needs none (its upgrade is an operator's step), nor does an in-memory one."""
    database = engine.url.database if engine.dialect.name == "sqlite" else None
    if not database or database == ":memory:" or database.startswith("file:"):
        yield
        return
    folder = os.open(Path(database).expanduser().parent, os.O_RDONLY)
    try:
        fcntl.flock(folder, fcntl.LOCK_EX)
        yield
    finally:
        os.close(folder)  # releases the lock


def _stamped_revision(engine: Engine) -> str | None:
    """The revision in Alembic's version table, in one query; None when there is none (a
    database that cannot be reached raises as it would anywhere)."""
    with engine.connect() as connection:
        try:
            return connection.exec_driver_sql("SELECT version_num FROM alembic_version").scalar()
        except sa.exc.DBAPIError:
            return None


def _known_revisions() -> set[str | None]:
    from alembic.script import ScriptDirectory

    scripts = ScriptDirectory.from_config(alembic_config())
    return {None} | {script.revision for script in scripts.walk_revisions()}
