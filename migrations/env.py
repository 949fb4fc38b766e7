"""Alembic environment for sdq.

sdq runs migrations in code (`sdq.db.session`), handing its own connection over in
`config.attributes["connection"]`. During development the same scripts run from the Alembic
command line against a scratch database:

    alembic -c migrations/alembic.ini -x url=sqlite:///dev.db upgrade head
    alembic -c migrations/alembic.ini -x url=sqlite:///dev.db revision --autogenerate -m "..."
"""
from __future__ import annotations

from functools import partial
from typing import Any

from alembic import context
from sqlalchemy.engine import Connection

import sdq.db.models  # noqa: F401  (registers the tables on Base.metadata)
from sdq.db.base import Base
from sdq.db.fulltext import is_fulltext_object
from sdq.db.session import engine_from_url

STATEMENT_CHECKED_KEYS = frozenset({"fk_items_job_id_jobs", "fk_items_model_id_models"})
"""Foreign keys that PostgreSQL enforces with statement-level triggers (revision 0002)."""


def include_object(
    obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any, *, dialect: str = ""
) -> bool:
    """Leave out of comparisons what the migrations write by hand: the full-text objects, and
    on PostgreSQL the item foreign keys that triggers enforce instead."""
    if type_ == "foreign_key_constraint" and dialect == "postgresql" and name in STATEMENT_CHECKED_KEYS:
        return False
    return not (reflected and compare_to is None and is_fulltext_object(name, type_))


def run_migrations(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        include_object=partial(include_object, dialect=connection.dialect.name),
        # SQLite cannot ALTER most things; batch mode rebuilds the table instead.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    raise SystemExit("sdq migrations need a database connection; there is no offline (--sql) mode")

_connection = context.config.attributes.get("connection")
if _connection is not None:
    run_migrations(_connection)
else:
    _url = context.get_x_argument(as_dictionary=True).get("url")
    if not _url:
        raise SystemExit("name the database: alembic -c migrations/alembic.ini -x url=URL ...")
    with engine_from_url(_url).connect() as _own:
        run_migrations(_own)
