"""`sdq jobs` and `sdq status`: what has been submitted, and how far each job is."""
from __future__ import annotations

import json
from typing import Any

import click

from sdq.cli.common import database_session, emit, limit_option, output_options, plain
from sdq.cli.progress import duration, rate_text
from sdq.core.jobspec import CHECKER_FAILED
from sdq.db.models import Job, Status
from sdq.db.queries import (
    failure_reasons,
    flagged_counts,
    get_job,
    job_progress,
    recent_jobs,
    unchecked_count,
)

_COLUMNS = ["id", "name", "status", "items", "done", "failed", "flagged", "created"]


_FIELDS = ("id", "name", "status", "items", "done", "failed", "flagged", "created", "finished",
           "priority", "tags", "safety_checker", "on_flag")
"""The fields of `_job_record`: the header of `jobs --csv`, with jobs or without."""


def _job_record(job: Job, counts: dict[Status, int], flagged: int) -> dict[str, Any]:
    """`flagged`: images the safety checker flagged, whatever became of them; `safety_checker`
    is None for a job that runs none (its images are then not checked, not "not flagged")."""
    return {"id": job.id, "name": job.name or job.source_name, "status": job.status,
            "items": sum(counts.values()), "done": counts[Status.DONE],
            "failed": counts[Status.FAILED], "flagged": flagged, "created": job.created_at,
            "finished": job.finished_at, "priority": job.priority, "tags": job.tags or [],
            "safety_checker": job.safety_checker, "on_flag": job.on_flag}


@click.command()
@limit_option(20)
@output_options("json", "csv")
def jobs(limit: int | None, output: str | None) -> None:
    """List the newest jobs with their item counts.

    \b
    Examples:
      sdq jobs
      sdq jobs --limit 100 --csv > jobs.csv
    """
    with database_session() as session:
        listed = recent_jobs(session, limit)
        flagged = flagged_counts(session, (job.id for job, _ in listed))
        records = [_job_record(job, counts, flagged[job.id]) for job, counts in listed]
    emit(records, _COLUMNS, output, fields=_FIELDS, empty="no jobs yet; submit one with `sdq submit FILE`")


@click.command()
@click.argument("job_id", metavar="JOB", type=int)
@output_options("json")
def status(job_id: int, output: str | None) -> None:
    """Show a job's progress: items per status, images/s, time left, and why items failed.

    Failures with the same error are counted together, with the first item that had it.

    \b
    Examples:
      sdq status 42
      sdq status 42 --json | jq .eta_s
    """
    with database_session() as session:
        job = get_job(session, job_id)
        progress = job_progress(session, job_id)
        failures = failure_reasons(session, job_id)
        record = _job_record(job, progress.counts, flagged_counts(session, [job_id])[job_id])
        record["not_checked"] = unchecked_count(session, job_id)
    record["checker_failed"] = sum(count for error, count, _ in failures
                                   if (error or "").startswith(CHECKER_FAILED))
    if output == "json":
        click.echo(json.dumps({
            **{k: plain(v) for k, v in record.items()},
            "counts": {s.value: n for s, n in progress.counts.items()},
            "reused": progress.reused, "images_per_s": progress.images_per_s, "eta_s": progress.eta_s,
            "stalled_s": progress.stalled_s,
            "failures": [{"error": e, "items": n, "first_item": i} for e, n, i in failures],
        }, indent=2))
        return
    reused = f" ({progress.reused} reused from stored images)" if progress.reused else ""
    click.echo(f"Job {job_id} ({record['name'] or 'unnamed'}): {plain(job.status)}, "
               f"{record['done']}/{record['items']} done{reused}")
    click.echo("  " + "  ".join(f"{s.value} {n}" for s, n in progress.counts.items() if n))
    rate = progress.images_per_s
    line = rate_text(rate) if rate or not progress.reused else \
        "nothing generated: every image done was reused"
    if progress.stalled_s is not None:
        line += (f", none finished for {duration(progress.stalled_s)}: stalled, time left "
                 "unknown (`sdq workers` shows who is working)")
    elif progress.remaining:
        eta = progress.eta_s
        line += ", time left unknown" if eta is None else f", about {duration(eta)} left"
    click.echo("  " + line)
    for error, count, first in failures:
        click.echo(f"  failed x{count} (first: item {first}): {error or 'no error recorded'}")
    unchecked = (f", {record['not_checked']} not checked (reused before checks entered the "
                 "cache key)" if record["not_checked"] else "")
    if job.safety_checker and record["checker_failed"]:
        flagged = f"; {record['flagged']} flagged" if record["flagged"] else ""
        click.echo(f"  safety checker: failed to load, {record['checker_failed']} item(s) failed "
                   f"unchecked{flagged} (on flag: {job.on_flag}){unchecked}")
    elif job.safety_checker:
        click.echo(f"  safety checker: {record['flagged']} flagged (on flag: {job.on_flag})"
                   f"{unchecked}")
    else:
        click.echo("  safety checker: none (images not checked)")
    if job.status == Status.PENDING and progress.remaining:
        click.echo(f"  nothing runs it now (an interrupted run?): `sdq resume {job_id}` "
                   "goes on without redoing what is done")
