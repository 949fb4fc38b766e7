"""`sdq retry`, `sdq cancel` and `sdq reconcile`: put work back in the queue, or take it out."""
from __future__ import annotations

from typing import TYPE_CHECKING

import click

from sdq.cli.common import load_settings, output_options, report
from sdq.cli.errors import Reported
from sdq.core.errors import CheckFailed

if TYPE_CHECKING:
    from sdq.jobs.lifecycle import Requeued


def _report_requeued(output: str | None, done: Requeued, job_id: int | None, what: str) -> None:
    """Say what really happened: enqueued for the workers, or (embedded mode) run here, with
    exit status 1 if any item failed again."""
    record: dict[str, object] = {"job": job_id, "items": done.items, "batches": done.batches}
    head = f"Job {job_id}: " if job_id is not None else ""
    if done.report is None:
        report(record, f"{head}{done.items} {what} re-enqueued in {done.batches} batch(es)",
               output)
        return
    ran = done.report
    why = f" (`sdq status {job_id}` says why)" if ran.failed and job_id is not None else ""
    report({**record, "done": ran.done, "failed": ran.failed},
           f"{head}{done.items} {what} run again here (no broker): {ran.done} done, "
           f"{ran.failed} failed{why}", output)
    if ran.failed:
        raise Reported(CheckFailed(f"{ran.failed} item(s) failed again"))


@click.command()
@click.argument("job_id", type=int)
@output_options("json")
def retry(job_id: int, output: str | None) -> None:
    """Re-enqueue the failed items of JOB_ID, each with a fresh set of attempts.

    With no broker (embedded mode) they run again here instead; the exit status is then 1
    if any of them failed again. A job without failed items is left as it is (exit status 0).

    \b
    Example:
      sdq retry 42
    """
    from sdq.jobs.lifecycle import retry_job
    from sdq.worker.factory import runner_from_settings

    done = retry_job(load_settings(need_broker=False), job_id, runner_from_settings)
    if not done.items:
        report({"job": job_id, "items": 0, "batches": 0},
               f"Job {job_id} has no failed items; nothing to retry", output)
        return
    _report_requeued(output, done, job_id, "failed item(s)")


@click.command()
@click.argument("job_id", type=int)
@output_options("json")
def cancel(job_id: int, output: str | None) -> None:
    """Cancel the pending and queued items of JOB_ID; batches already running finish.

    \b
    Example:
      sdq cancel 42
    """
    from sdq.jobs.lifecycle import cancel_job

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
    from sdq.jobs.lifecycle import reconcile as reconcile_items
    from sdq.worker.factory import runner_from_settings

    _report_requeued(output, reconcile_items(load_settings(need_broker=False), runner_from_settings),
                     None, "item(s)")
