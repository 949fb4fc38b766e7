"""What the read-side commands share: the database session, output formats, one table renderer.

Every command parses its arguments, calls library functions inside `database_session`, and
hands plain records to `emit`, so a table, JSON and CSV always carry the same fields.
"""
from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import click
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from sdq.db.models import Item
from sdq.db.session import SchemaMismatch, open_database
from sdq.sdmodel.files import write_atomically
from sdq.sdmodel.params import FIELDS
from sdq.worker.settings import Settings
from sdq.worker.images.storage import Storage, StorageError, open_storage

F = TypeVar("F", bound=Callable[..., Any])
Record = Mapping[str, Any]


def load_settings(*, need_broker: bool) -> Settings:
    """The settings, or one readable line; commands that only make sense with a broker say so."""
    try:
        settings = Settings.load()
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    if need_broker and settings.broker_url is None:
        raise click.ClickException(
            "SDQ_BROKER_URL is not set: workers serve a broker (e.g. redis://host:6379/0); "
            "without one, `sdq submit` runs jobs in-process")
    return settings


@contextmanager
def database_session(settings: Settings | None = None) -> Iterator[Session]:
    """A session on the configured database; its failures become one readable line that
    names the database (password hidden)."""
    settings = settings or load_settings(need_broker=False)
    try:
        engine = open_database(settings.database_url)
    except (SchemaMismatch, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    except SQLAlchemyError as exc:
        raise click.ClickException(_described(settings.database_url, exc)) from None
    try:
        with Session(engine) as session:
            yield session
    except SQLAlchemyError as exc:
        raise click.ClickException(_described(settings.database_url, exc)) from None
    finally:
        engine.dispose()


def configured_storage(settings: Settings) -> Storage:
    """The image store of the settings, or one readable line."""
    try:
        return open_storage(settings.storage_url, max_attempts=settings.max_attempts)
    except StorageError as exc:
        raise click.ClickException(str(exc)) from None


def write_file(path: Path, data: bytes) -> None:
    """Write `path` whole or not at all; a folder that cannot be written is one line."""
    try:
        write_atomically(path, data)
    except OSError as exc:
        raise click.ClickException(f"cannot write {path}: {exc.strerror or exc}") from None


def _described(url: str, exc: SQLAlchemyError) -> str:
    shown = make_url(url).render_as_string(hide_password=True)
    return f"{shown}: {str(getattr(exc, 'orig', None) or exc).strip().splitlines()[0]}"


def output_options(*formats: str) -> Callable[[F], F]:
    """`--json`, `--csv` ... switches that set one `output` parameter (None: a table)."""
    helps = {"json": "Print JSON, for scripts.", "csv": "Print CSV, for spreadsheets."}

    def decorate(command: F) -> F:
        for name in reversed(formats):
            command = click.option(f"--{name}", "output", flag_value=name, help=helps[name])(command)
        return command
    return decorate


def limit_option(default: int) -> Callable[[F], F]:
    return click.option("--limit", type=click.IntRange(1), default=default, show_default=True,
                        help="Show at most this many.")


def plain(value: Any) -> Any:
    """A value as JSON and CSV want it: times in ISO 8601, enums as their text."""
    if isinstance(value, datetime):
        return value.isoformat(timespec="seconds")
    return getattr(value, "value", value)


def shown(value: Any) -> str:
    """A value as a table cell: times to the minute (UTC), nothing for None."""
    if value is None:
        return ""
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M")
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return str(plain(value))


def render_table(records: Sequence[Record], columns: Sequence[str]) -> str:
    """Left-aligned columns under their names, numbers right-aligned."""
    cells = [[shown(record.get(c)) for c in columns] for record in records]
    widths = [max([len(c), *(len(row[i]) for row in cells)]) for i, c in enumerate(columns)]
    numeric = [all(isinstance(r.get(c), (int, float)) or r.get(c) is None for r in records)
               for c in columns]
    lines = []
    for row in [list(columns), *cells]:
        parts = [cell.rjust(w) if right else cell.ljust(w)
                 for cell, w, right in zip(row, widths, numeric)]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def emit(records: Sequence[Record], columns: Sequence[str], output: str | None,
         *, empty: str = "nothing found") -> None:
    """Print records as a table (the given columns), JSON (every field) or CSV (every field)."""
    if output == "json":
        click.echo(json.dumps([{k: plain(v) for k, v in r.items()} for r in records], indent=2,
                              ensure_ascii=False))
    elif output == "csv":
        buffer = io.StringIO()
        fields = list(records[0]) if records else list(columns)
        writer = csv.DictWriter(buffer, fields, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for record in records:
            writer.writerow({k: shown(v) if isinstance(v, list) else plain(v)
                             for k, v in record.items()})
        click.echo(buffer.getvalue(), nl=False)
    elif records:
        click.echo(render_table(records, columns))
    else:
        click.echo(empty, err=True)


def item_record(item: Item) -> dict[str, Any]:
    """An item's provenance and queue state as one flat record (JSON, CSV, sidecar files)."""
    model = item.model
    return {
        "id": item.id, "job": item.job_id, "row": item.row_index, "status": item.status,
        **{name: getattr(item, name) for name in FIELDS},
        "model": model.name if model else None, "model_sha256": model.sha256 if model else None,
        "tags": item.tags or [], "attempts": item.attempts, "error": item.last_error,
        "batch": item.batch_id, "batch_position": item.batch_position,
        "image_key": item.image_key, "image_sha256": item.image_sha256,
        "watermark": item.watermark, "worker": item.worker_host, "device": item.device,
        "created": item.created_at, "started": item.started_at, "finished": item.finished_at,
        "duration_s": item.duration_s,
    }
