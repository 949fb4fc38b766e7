"""SQLite: ids of jobs and items are never handed out again, even after `sdq purge`.

Revision ID: 0005
Revises: 0003
Create Date: 2026-12-02

Without AUTOINCREMENT, SQLite gives a new row the largest id in the table plus one: once the
newest job is purged, the next job gets its id, its items the purged items' ids and storage
keys, and a PNG downloaded earlier names (job, item) ids that now belong to another image
(`sdq verify` says MISMATCH, an export into the same folder keeps the old files). Job and
item ids are what provenance records, so both tables get AUTOINCREMENT: SQLite then never
goes below the largest id it ever gave (kept in `sqlite_sequence`).

AUTOINCREMENT can only be declared when a table is created, so each table is rebuilt from its
own stored definition (whatever columns earlier revisions gave it), with its rows, indexes
and triggers (the full-text triggers of 0003 included; the FTS index keeps pointing at the
same ids, which are copied). The rebuild runs with foreign keys off (`db.session._migrate`), so
dropping the old `jobs` does not cascade to items. PostgreSQL ids come from sequences
(identity/serial columns), which never hand a value out twice: no-op there.
"""
import re
from collections.abc import Sequence

from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLES = ("jobs", "items")


def _with_autoincrement(sql: str, table: str) -> str:
    """The CREATE TABLE statement with `id` as an AUTOINCREMENT key (the named constraint kept)."""
    sql = re.sub(rf",\s*CONSTRAINT pk_{table} PRIMARY KEY \(id\)", "", sql, count=1)
    return re.sub(r"\bid INTEGER NOT NULL\b",
                  f"id INTEGER NOT NULL CONSTRAINT pk_{table} PRIMARY KEY AUTOINCREMENT", sql, count=1)


def _without_autoincrement(sql: str, table: str) -> str:
    sql = sql.replace(f"id INTEGER NOT NULL CONSTRAINT pk_{table} PRIMARY KEY AUTOINCREMENT",
                      "id INTEGER NOT NULL", 1)
    return re.sub(r"\n\)$", f", \n\tCONSTRAINT pk_{table} PRIMARY KEY (id)\n)", sql.rstrip())


def _rebuild(table: str, autoincrement: bool) -> None:
    """Recreate `table` from its stored definition, changed by `autoincrement`."""
    bind = op.get_bind()
    rows = bind.exec_driver_sql(
        "SELECT type, name, sql FROM sqlite_master WHERE tbl_name = ? AND sql IS NOT NULL",
        (table,)).all()
    [create] = [sql for kind, _, sql in rows if kind == "table"]
    if ("AUTOINCREMENT" in create) == autoincrement:
        return
    change = _with_autoincrement if autoincrement else _without_autoincrement
    new = f"_sdq_new_{table}"
    # A renamed table's definition names it in quotes: `CREATE TABLE "items" (`.
    op.execute(re.sub(rf'^CREATE TABLE "?{table}"? \(', f"CREATE TABLE {new} (", change(create, table)))
    op.execute(f"INSERT INTO {new} SELECT * FROM {table}")
    op.execute(f"DROP TABLE {table}")  # its indexes and triggers go with it
    op.execute(f"ALTER TABLE {new} RENAME TO {table}")
    for kind, _, sql in rows:
        if kind in ("index", "trigger"):
            op.execute(sql)


def upgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    for table in TABLES:
        _rebuild(table, autoincrement=True)


def downgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    for table in TABLES:
        _rebuild(table, autoincrement=False)
