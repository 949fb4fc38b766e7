"""`sdq watch` and `sdq resume`: follow a job to its end, or finish an interrupted one."""
from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Callable

import click

from sdq.cli.common import database_session, load_settings
from sdq.db.models import Job, Status
from sdq.db.queries import Progress, job_progress
from sdq.worker.settings import Settings

POLL_S = 1.0
"""How often `watch` reads the job's counts: one small query, cheap for any database."""


def _finished(progress: Progress) -> int:
    return sum(progress.counts[s] for s in (Status.DONE, Status.FAILED, Status.CANCELLED))


def follow(settings: Settings, job_id: int, *, poll_s: float = POLL_S) -> Progress:
    """Show a progress bar (stderr) of the job until none of its items is left to run; returns
    its last progress. Ctrl-C stops watching (the job goes on) with one line, exit status 1."""
    with database_session(settings) as session:
        if session.get(Job, job_id) is None:
            raise click.ClickException(f"no job {job_id}")
        progress = job_progress(session, job_id)
        total = sum(progress.counts.values())
        try:
            with click.progressbar(length=total, label=f"job {job_id}", file=sys.stderr,
                                   show_pos=True) as bar:
                while True:
                    bar.update(_finished(progress) - bar.pos)
                    if not progress.remaining:
                        break
                    time.sleep(poll_s)
                    session.rollback()  # a fresh snapshot, and no transaction held open
                    progress = job_progress(session, job_id)
        except KeyboardInterrupt:
            click.echo(f"\nStopped watching job {job_id}; it goes on (`sdq watch {job_id}`).",
                       err=True)
            sys.exit(1)
    return progress


def outcome(job_id: int, progress: Progress) -> tuple[dict[str, Any], str, int]:
    """A finished job's record, summary line and exit status (0 only when every item is done)."""
    counts = {s.value: n for s, n in progress.counts.items() if n}
    done, total = progress.counts[Status.DONE], sum(progress.counts.values())
    text = f"Job {job_id}: {done}/{total} done" + "".join(
        f", {n} {s.value}" for s, n in progress.counts.items()
        if n and s in (Status.FAILED, Status.CANCELLED))
    if progress.counts[Status.FAILED]:
        text += f" (`sdq status {job_id}` says why)"
    return {"job_id": job_id, "counts": counts}, text, 0 if done == total else 1


@click.command()
@click.argument("job_id", metavar="JOB", type=int)
@click.option("--json", "as_json", is_flag=True, help="Print the final counts as JSON.")
def watch(job_id: int, as_json: bool) -> None:
    """Show a live progress bar of JOB until none of its items is left to run.

    Exit status 0 when every item is done, 1 if any failed or was cancelled (or on Ctrl-C,
    which stops watching, not the job).

    \b
    Example:
      sdq watch 42 && sdq gallery 42 -o job42/
    """
    progress = follow(load_settings(need_broker=False), job_id)
    record, text, status = outcome(job_id, progress)
    click.echo(json.dumps(record) if as_json else text)
    sys.exit(status)


@contextmanager
def recorded_bar(label: str) -> Iterator[Callable[[int, int], Callable[[int], None]]]:
    """A progress bar on stderr opened once the total is known: yields `start(total, done)`,
    which opens it and returns the per-chunk `on_recorded(n)` callback."""
    bars: list[Any] = []

    def start(total: int, done: int = 0) -> Callable[[int], None]:
        bar = click.progressbar(length=total, label=label, file=sys.stderr, show_pos=True)
        bars.append(bar.__enter__())
        bar.update(done)
        return bar.update

    try:
        yield start
    finally:
        for bar in bars:
            bar.__exit__(None, None, None)


@click.command()
@click.argument("job_id", metavar="JOB", type=int)
@click.option("--json", "as_json", is_flag=True, help="Print the outcome as JSON.")
def resume(job_id: int, as_json: bool) -> None:
    """Finish JOB after its embedded run was interrupted (Ctrl-C, a crash), redoing nothing.

    Items still to run (pending, queued, or left running under an expired lease) run again
    here, in-process, as `sdq submit` runs them; finished items are kept. Items whose lease is
    still live may belong to a run that is still going and are left to it; after a crash, once
    the lease runs out (SDQ_VISIBILITY_TIMEOUT, at most 120 s), run `sdq resume` again. A run
    stopped with Ctrl-C hands its items back itself, so resume can follow at once. With a
    broker configured, the items are enqueued for the workers instead.

    \b
    Example:
      sdq resume 42
    """
    from sdq.db.session import SchemaMismatch
    from sdq.worker.jobs.lifecycle import resume_job

    settings = load_settings(need_broker=False)
    with recorded_bar(f"job {job_id}") as start:
        try:
            resumed = resume_job(settings, job_id,
                                 on_planned=lambda total, done: start(total, done))
        except (LookupError, SchemaMismatch, ValueError) as exc:
            raise click.ClickException(str(exc).strip("'\"")) from None
        except KeyboardInterrupt:
            raise click.ClickException(f"interrupted; `sdq resume {job_id}` goes on from here")
    with database_session(settings) as session:
        progress = job_progress(session, job_id)
    record, text, status = outcome(job_id, progress)
    record |= {"resumed": resumed.items, "batches": resumed.batches, "leased": resumed.leased}
    if resumed.leased:
        text += (f"; {resumed.leased} item(s) still leased by another run: if it is gone, "
                 f"`sdq resume {job_id}` again after the lease runs out")
    elif not resumed.items:
        text = "nothing to resume. " + text
    if not settings.embedded and resumed.items:
        text += f"; {resumed.items} item(s) enqueued (`sdq watch {job_id}`)"
        status = 0
    click.echo(json.dumps(record) if as_json else text)
    sys.exit(status)
