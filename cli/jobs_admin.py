"""`sdq retry`, `sdq cancel` and `sdq reconcile`: put work back in the queue, or take it out."""
from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any, Callable, TypeVar

import click

from sdq.cli.common import load_settings

T = TypeVar("T")


def _report(as_json: bool, record: dict[str, object], text: str) -> None:
    click.echo(json.dumps(record) if as_json else text)


def _run(action: Callable[..., T], *args: Any) -> T:
    """Call a lifecycle function, turning its expected failures into one line."""
    from sdq.db.session import SchemaMismatch

    try:
        return action(*args)
    except (LookupError, SchemaMismatch, ValueError) as exc:
        raise click.ClickException(str(exc).strip("'\"")) from None


json_option = click.option("--json", "as_json", is_flag=True, help="Print the outcome as JSON.")


@click.command()
@click.argument("job_id", type=int)
@json_option
def retry(job_id: int, as_json: bool) -> None:
    """Re-enqueue the failed items of JOB_ID, each with a fresh set of attempts.

    \b
    Example:
      sdq retry 42
    """
    from sdq.worker.jobs.lifecycle import retry_job

    done = _run(retry_job, load_settings(need_broker=False), job_id)
    _report(as_json, {"job": job_id, **asdict(done)},
            f"Job {job_id}: {done.items} failed item(s) re-enqueued in {done.batches} batch(es)")


@click.command()
@click.argument("job_id", type=int)
@json_option
def cancel(job_id: int, as_json: bool) -> None:
    """Cancel the pending and queued items of JOB_ID; batches already running finish.

    \b
    Example:
      sdq cancel 42
    """
    from sdq.worker.jobs.lifecycle import cancel_job

    count = _run(cancel_job, load_settings(need_broker=False), job_id)
    _report(as_json, {"job": job_id, "cancelled": count}, f"Job {job_id}: {count} item(s) cancelled")


@click.command()
@json_option
def reconcile(as_json: bool) -> None:
    """Re-enqueue work the broker lost, judged from the database.

    Pending and queued items, and running items whose lease expired (their worker is gone),
    go back to their models' queues. Safe to run at any time: items that are done or still
    leased are skipped by the workers, so nothing is generated or recorded twice.

    \b
    Example (after Redis restarted without persistence):
      sdq reconcile
    """
    from sdq.worker.jobs.lifecycle import reconcile as reconcile_items

    done = _run(reconcile_items, load_settings(need_broker=False))
    _report(as_json, asdict(done), f"{done.items} item(s) re-enqueued in {done.batches} batch(es)")
