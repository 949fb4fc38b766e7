"""`sdq retry`, `sdq cancel` and `sdq reconcile`: put work back in the queue, or take it out."""
from __future__ import annotations

from dataclasses import asdict

import click

from sdq.cli.common import load_settings, output_options, report


@click.command()
@click.argument("job_id", type=int)
@output_options("json")
def retry(job_id: int, output: str | None) -> None:
    """Re-enqueue the failed items of JOB_ID, each with a fresh set of attempts.

    \b
    Example:
      sdq retry 42
    """
    from sdq.worker.jobs.lifecycle import retry_job

    done = retry_job(load_settings(need_broker=False), job_id)
    report({"job": job_id, **asdict(done)},
           f"Job {job_id}: {done.items} failed item(s) re-enqueued in {done.batches} batch(es)", output)


@click.command()
@click.argument("job_id", type=int)
@output_options("json")
def cancel(job_id: int, output: str | None) -> None:
    """Cancel the pending and queued items of JOB_ID; batches already running finish.

    \b
    Example:
      sdq cancel 42
    """
    from sdq.worker.jobs.lifecycle import cancel_job

    count = cancel_job(load_settings(need_broker=False), job_id)
    report({"job": job_id, "cancelled": count}, f"Job {job_id}: {count} item(s) cancelled", output)


@click.command()
@output_options("json")
def reconcile(output: str | None) -> None:
    """Re-enqueue work the broker lost, judged from the database.

    Pending and queued items, and running items whose lease expired (their worker is gone),
    go back to their models' queues. Safe to run at any time: items that are done or still
    leased are skipped by the workers, so nothing is generated or recorded twice.

    \b
    Example (after Redis restarted without persistence):
      sdq reconcile
    """
    from sdq.worker.jobs.lifecycle import reconcile as reconcile_items

    done = reconcile_items(load_settings(need_broker=False))
    report(asdict(done), f"{done.items} item(s) re-enqueued in {done.batches} batch(es)", output)
