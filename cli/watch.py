"""`sdq watch` and `sdq resume`: follow a job to its end, or finish an interrupted one."""
from __future__ import annotations

import click

from sdq.cli.common import (
    database_session,
    exit_status,
    follow,
    load_settings,
    outcome,
    output_options,
    recorded_bar,
    report,
)


@click.command()
@click.argument("job_id", metavar="JOB", type=int)
@output_options("json")
def watch(job_id: int, output: str | None) -> None:
    """Show a live progress bar of JOB until none of its items is left to run.

    Exit status 0 when every item is done, 1 if any failed or was cancelled (or on Ctrl-C,
    which stops watching, not the job).

    \b
    Example:
      sdq watch 42 && sdq gallery 42 -o job42/
    """
    progress = follow(load_settings(need_broker=False), job_id)
    record, text, status = outcome(job_id, progress)
    report(record, text, output)
    exit_status(job_id, status)


@click.command()
@click.argument("job_id", metavar="JOB", type=int)
@output_options("json")
def resume(job_id: int, output: str | None) -> None:
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
    from sdq.db.queries import job_progress
    from sdq.jobs.lifecycle import resume_job
    from sdq.worker.factory import runner_from_settings

    settings = load_settings(need_broker=False)
    with recorded_bar(f"job {job_id}") as start:
        try:
            resumed = resume_job(settings, job_id,
                                 on_planned=lambda total, done: start(total, done),
                                 on_step=start.step, make_runner=runner_from_settings)
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
    report(record, text, output)
    exit_status(job_id, status)
