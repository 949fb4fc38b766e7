"""`sdq db`: create, upgrade and inspect the database schema."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import click
from alembic.util import CommandError
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from sdq.cli.common import load_settings, output_options, report
from sdq.cli.errors import BAD_INPUT, CommandFailed
from sdq.core.errors import Unavailable
from sdq.core.settings import mask_url
from sdq.db.session import (
    current_revision,
    downgrade,
    engine_from_url,
    head_revision,
    upgrade,
)


@contextmanager
def _database() -> Iterator[tuple[Engine, str]]:
    """The configured database's engine and its URL as shown to users (no password); library
    errors become one readable line."""
    settings = load_settings(need_broker=False)
    try:
        engine = engine_from_url(settings.database_url)
    except ValueError as exc:
        raise CommandFailed(f"SDQ_DATABASE_URL: {exc}", BAD_INPUT) from None
    shown = mask_url(settings.database_url)
    try:
        yield engine, shown
    except SQLAlchemyError as exc:
        detail = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        raise Unavailable(f"{shown}: {detail}") from None
    except CommandError as exc:
        raise CommandFailed(f"{shown}: {exc}", BAD_INPUT) from None
    finally:
        engine.dispose()


@click.group("db")
def db() -> None:
    """Create, upgrade and inspect the database schema.

    The database is SDQ_DATABASE_URL: a PostgreSQL server (postgresql://user@host/dbname)
    or, by default, the SQLite file sdq.db under SDQ_HOME, which sdq also creates and
    upgrades by itself on first use. A server is only ever upgraded by `sdq db upgrade`.

    \b
    Examples:
      sdq db current
      sdq db current --json | jq .up_to_date
      SDQ_DATABASE_URL=postgresql://sdq@db.internal/sdq sdq db upgrade
    """


@db.command("upgrade")
@click.argument("revision", default="head")
@output_options("json")
def upgrade_command(revision: str, output: str | None) -> None:
    """Upgrade the schema to REVISION (default: the newest this sdq knows).

    Runs in one transaction: on an error the database is left as it was.

    \b
    Example:
      sdq db upgrade
    """
    with _database() as (engine, shown):
        before = current_revision(engine)
        upgrade(engine, revision)
        after = current_revision(engine)
    text = (f"{shown}: already at {after}" if before == after else
            f"{shown}: upgraded from {before or 'an empty database'} to {after}")
    report({"database": shown, "before": before, "after": after}, text, output)


@db.command("current")
@output_options("json")
def current_command(output: str | None) -> None:
    """Show the schema revision of the database, and whether it is the newest.

    \b
    Example:
      sdq db current
    """
    head = head_revision()
    with _database() as (engine, shown):
        current = current_revision(engine)
    if current is None:
        text = f"{shown}: empty (no sdq schema); run `sdq db upgrade`"
    elif current == head:
        text = f"{shown}: {current} (head)"
    else:
        text = f"{shown}: {current} (head is {head}; run `sdq db upgrade`)"
    report({"database": shown, "current": current, "head": head, "up_to_date": current == head},
           text, output)


@db.command("downgrade")
@click.argument("revision")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@output_options("json")
def downgrade_command(revision: str, yes: bool, output: str | None) -> None:
    """Downgrade the schema to REVISION; "base" removes every sdq table and its data.

    Downgrades drop what later revisions added, data included, so sdq asks first.

    \b
    Example:
      sdq db downgrade 0001 --yes
    """
    with _database() as (engine, shown):
        if not yes:
            click.confirm(f"Downgrade {shown} to {revision}, dropping what newer revisions hold?",
                          abort=True)
        downgrade(engine, revision)
        now = current_revision(engine)
    report({"database": shown, "current": now},
           f"{shown}: now at {now or 'base (no sdq tables)'}", output)
