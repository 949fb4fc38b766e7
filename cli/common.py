"""What the commands share: settings, the database session, the image store, output formats,
one table renderer, and following a job's progress.

Every command parses its arguments, calls library functions inside `database_session`, and
hands plain records to `emit`, so a table, JSON and CSV always carry the same fields. Library
errors are left to the `sdq` group, which turns each kind into one line and one exit status.
"""
from __future__ import annotations

import csv
import io
import json
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from sdq.cli.errors import BAD_INPUT, CommandFailed, Reported
from sdq.cli.progress import ProgressLine
from sdq.core.errors import CheckFailed, Unavailable
from sdq.sdmodel.files import write_atomically
from sdq.core.params import FIELDS
from sdq.core.settings import Settings, mask_url
from sdq.core.states import FINISHED, Status
from sdq.images.storage import configured_storage  # noqa: F401 - the commands' store

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from sdq.db.models import Item
    from sdq.db.queries import Progress

F = TypeVar("F", bound=Callable[..., Any])
Record = Mapping[str, Any]

POLL_S = 1.0
"""How often `watch` reads the job's counts: one small query, cheap for any database."""


def load_settings(*, need_broker: bool) -> Settings:
    """The settings (a broken config file raises SettingsError, one line naming the file and
    the key); commands that only make sense with a broker say so."""
    settings = Settings.load()
    if need_broker and settings.broker_url is None:
        raise CommandFailed(
            "SDQ_BROKER_URL is not set: workers serve a broker (e.g. redis://host:6379/0); "
            "without one, `sdq submit` runs jobs in-process", BAD_INPUT)
    return settings


@contextmanager
def database_session(settings: Settings | None = None, *, reads_only: bool = False
                     ) -> Iterator[Session]:
    """A session on the configured database. A database that cannot be reached, or is at
    another schema, is `Unavailable`, named in the message (password hidden). `reads_only`:
    a long read (an export) that must not hold SQLite's write lock (`db.session.read_only`)."""
    from sqlalchemy.exc import SQLAlchemyError
    from sqlalchemy.orm import Session

    from sdq.db.session import open_database, read_only

    settings = settings or load_settings(need_broker=False)
    try:
        engine = open_database(settings.database_url)
    except ValueError as exc:
        raise CommandFailed(f"SDQ_DATABASE_URL: {exc}", BAD_INPUT) from None
    except SQLAlchemyError as exc:
        raise Unavailable(_described(settings.database_url, exc)) from None
    try:
        with Session(read_only(engine) if reads_only else engine) as session:
            yield session
    except SQLAlchemyError as exc:
        raise Unavailable(_described(settings.database_url, exc)) from None
    finally:
        engine.dispose()


def write_file(path: Path, data: bytes) -> None:
    """Write `path` whole or not at all; a folder that cannot be written is one line."""
    try:
        write_atomically(path, data)
    except OSError as exc:
        raise click.ClickException(f"cannot write {path}: {exc.strerror or exc}") from None


def _described(url: str, exc: Exception) -> str:
    return f"{mask_url(url)}: {str(getattr(exc, 'orig', None) or exc).strip().splitlines()[0]}"


def output_options(*formats: str, dest: str = "output") -> Callable[[F], F]:
    """`--json`, `--csv` ... switches that set one parameter, `dest` (None: text for people).
    Every command declares its formats this way."""
    helps = {"json": "Print JSON, for scripts.", "csv": "Print CSV, for spreadsheets."}

    def decorate(command: F) -> F:
        for name in reversed(formats):
            command = click.option(f"--{name}", dest, flag_value=name, help=helps[name])(command)
        return command
    return decorate


def limit_option(default: int) -> Callable[[F], F]:
    """`--limit N`, passed on as None for 0: no limit, as in sqlite-utils and llm."""
    return click.option("--limit", type=click.IntRange(0), default=default, show_default=True,
                        callback=lambda _ctx, _param, value: value or None,
                        help="Show at most this many (0: all).")


def report(record: dict[str, Any], text: str, output: str | None) -> None:
    """The outcome of a command that does one thing: `text` for people, `record` as one JSON
    object for scripts."""
    click.echo(json.dumps({k: plain(v) for k, v in record.items()}, ensure_ascii=False)
               if output == "json" else text)


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


FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
"""What makes a spreadsheet read a CSV cell as a formula (OWASP's list)."""


def csv_cell(value: Any) -> Any:
    """A cell safe to open in a spreadsheet: text starting like a formula (`=HYPERLINK(...)`,
    `+cmd|...`, `@SUM(...)`) gets a leading `'`, which spreadsheets show as text; numbers and
    JSON output are left exact. Every CSV sdq writes goes through this."""
    text = shown(value) if isinstance(value, list) else plain(value)
    return "'" + text if isinstance(text, str) and text.startswith(FORMULA_STARTS) else text


def emit(records: Sequence[Record], columns: Sequence[str], output: str | None,
         *, fields: Sequence[str] | None = None, empty: str = "nothing found") -> None:
    """Print records as a table (the given columns), JSON (every field) or CSV (`fields`,
    every field of a record, so that the header is the same whether or not anything
    matched: a script reading the CSV never meets another column set)."""
    if output == "json":
        click.echo(json.dumps([{k: plain(v) for k, v in r.items()} for r in records], indent=2,
                              ensure_ascii=False))
    elif output == "csv":
        buffer = io.StringIO()
        # RFC 4180's CRLF rows: with them the writer also quotes a cell holding a lone CR.
        # A record field missing from `fields` raises, so the two cannot drift apart.
        writer = csv.DictWriter(buffer, fields or columns, lineterminator="\r\n")
        writer.writeheader()
        for record in records:
            writer.writerow({k: csv_cell(v) for k, v in record.items()})
        click.echo(buffer.getvalue(), nl=False)
    elif records:
        click.echo(render_table(records, columns))
    else:
        click.echo(empty, err=True)


ITEM_FIELDS = (
    "id", "job", "row", "status", *FIELDS, "model", "model_sha256", "tags", "attempts", "error",
    "batch", "batch_position", "image_key", "image_sha256", "watermark", "worker", "device",
    "created", "started", "finished", "duration_s", "template", "template_values", "cache_key",
    "reused_from", "safety_flagged", "safety_action", "safety_checker_sha256",
    "safety_concept_scores", "safety_special_scores", "loras", "embeddings", "init_sha256",
    "init_source", "strength")
"""The fields of `item_record`, in order: the header of `search --csv`, matches or not."""


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
        "duration_s": item.duration_s, "template": item.template,
        "template_values": item.template_values, "cache_key": item.cache_key,
        "reused_from": item.reused_from,
        **safety_fields(item), **adapter_fields(item),
        "init_sha256": item.init_sha256, "init_source": item.init_source,
        "strength": item.strength,
    }


def adapter_fields(item: Item) -> dict[str, Any]:
    """The LoRAs and embeddings an item used, each entry with every key (empty lists for
    none), so every export format has one type for them (`jobs.export.STRUCTS`)."""
    return {"loras": [{"name": r["name"], "weight": r["weight"], "sha256": r["sha256"],
                       "a1111": r.get("a1111")} for r in item.loras or ()],
            "embeddings": [{"name": r["name"], "sha256": r["sha256"]} for r in item.embeddings or ()]}


def safety_fields(item: Item) -> dict[str, Any]:
    """The safety checker's verdict as typed fields, all None when no check ran."""
    scores = item.safety_scores or {}
    return {"safety_flagged": item.safety_flagged, "safety_action": item.safety_action,
            "safety_checker_sha256": item.safety_checker_sha256,
            "safety_concept_scores": scores.get("concept"),
            "safety_special_scores": scores.get("special")}


def _finished(progress: Progress) -> int:
    return sum(progress.counts[s] for s in FINISHED)


def follow(settings: Settings, job_id: int, *, poll_s: float = POLL_S,
           queues: Sequence[str] = ()) -> Progress:
    """Show a progress bar (stderr) of the job until none of its items is left to run; returns
    its last progress. Ctrl-C stops watching (the job goes on) with one line, exit status 1.
    While the job waits on `queues` that no live worker serves, it says so (and waits on)."""
    from sdq.db.queries import get_job, job_progress

    with database_session(settings) as session, ExitStack() as shown:
        get_job(session, job_id)
        progress = job_progress(session, job_id)
        unserved = _Unserved(settings, queues)
        try:  # from the first line shown: Ctrl-C may come as soon as it is out
            bar = ProgressLine(f"job {job_id}", sum(progress.counts.values()),
                               _finished(progress))
            shown.callback(bar.close)
            while progress.remaining:
                # No transaction held open over the broker check and the wait (and a fresh
                # snapshot for the next read).
                session.rollback()
                unserved.check()
                time.sleep(poll_s)
                progress = job_progress(session, job_id)
                bar.advance(_finished(progress) - bar.done)
        except KeyboardInterrupt:
            click.echo(f"\nStopped watching job {job_id}; it goes on (`sdq watch {job_id}`).",
                       err=True)
            raise Reported(CheckFailed(f"stopped watching job {job_id}")) from None
    return progress


WORKER_CHECK_S = 10.0
"""How often `submit --wait` looks for a live worker on the job's queues (in Redis)."""


class _Unserved:
    """Says, once each time it becomes true, that no live worker serves some of the queues."""

    def __init__(self, settings: Settings, queues: Sequence[str]) -> None:
        self.broker_url, self.queues = settings.broker_url, list(queues)
        self.next_check, self.said = 0.0, False

    def check(self) -> None:
        if not (self.broker_url and self.queues) or time.monotonic() < self.next_check:
            return
        from sdq.worker.heartbeat import serving

        self.next_check = time.monotonic() + WORKER_CHECK_S
        try:
            missing = [q for q in self.queues if q not in serving(self.broker_url, self.queues)]
        except Exception:  # noqa: BLE001 - a hint must never stop the wait
            return
        if missing and not self.said:
            click.echo(f"\nno live worker serves {', '.join(missing)}; waiting (start one "
                       "with `sdq worker --model REF` for that model)", err=True)
        self.said = bool(missing)


def outcome(job_id: int, progress: Progress) -> tuple[dict[str, Any], str, int]:
    """A finished job's record, summary line and exit status (0 only when every item is done)."""
    counts = {s.value: n for s, n in progress.counts.items() if n}
    done, total = progress.counts[Status.DONE], sum(progress.counts.values())
    text = f"Job {job_id}: {done}/{total} done" + "".join(
        f", {n} {s.value}" for s, n in progress.counts.items()
        if n and s in FINISHED and s is not Status.DONE)
    if progress.reused:
        text += f" ({progress.reused} reused from stored images)"
    if progress.counts[Status.FAILED]:
        text += f" (`sdq status {job_id}` says why)"
    return ({"job_id": job_id, "counts": counts, "reused": progress.reused}, text,
            0 if done == total else 1)


def exit_status(job_id: int, status: int) -> None:
    """After a job's summary is printed: exit 1, as `outcome` says, when not every item of the
    job was done."""
    if status:
        raise Reported(CheckFailed(f"job {job_id}: not every item is done"))


@contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM (systemd, docker, `kill`) handled as Ctrl-C: an in-process run hands back
    what it holds and the command prints how to resume, instead of dying with items leased
    and the job `running`. Only the main thread receives signals; elsewhere nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:  # None: a handler set outside Python, which cannot be put back; the default can
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C's KeyboardInterrupt would be, so both take one path."""


@contextmanager
def recorded_bar(label: str) -> Iterator[RecordedBar]:
    """Progress on stderr (`cli.progress`) shown once the total is known: `start(total, done)`
    shows it and returns it, to be called with each stored chunk's count (`on_recorded`);
    `step` follows the denoising steps in between, before and after `start`."""
    bar = RecordedBar(label)
    try:
        yield bar
    finally:
        if bar.progress is not None:
            bar.progress.close()


class RecordedBar:
    """The progress of an in-process run, shown from when its total is known."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.progress: ProgressLine | None = None

    def __call__(self, total: int, done: int = 0) -> ProgressLine:
        self.progress = ProgressLine(self.label, total, done)
        return self.progress

    def step(self, images: int, i: int, steps: int) -> None:
        if self.progress is not None:
            self.progress.step(images, i, steps)
