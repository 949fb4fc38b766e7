"""`sdq purge`: delete a job, its rows and its stored images."""
from __future__ import annotations

import json
from dataclasses import asdict

import click

from sdq.cli.common import configured_storage, database_session, load_settings, output_options


@click.command()
@click.argument("job_id", metavar="JOB", type=int)
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@output_options("json")
def purge(job_id: int, yes: bool, output: str | None) -> None:
    """Delete JOB for good: its items, their records and their stored images.

    Init images its items started from go too, unless items of another job start from them.

    Asks first, showing what will go (--yes skips the question). Refused while items of the
    job are running: cancel it first. If storage fails midway, nothing is removed from the
    database and the same command can be run again.

    \b
    Examples:
      sdq purge 42
      sdq purge 42 --yes --json
    """
    from sdq.jobs.maintenance import job_contents, purge_job

    settings = load_settings(need_broker=False)
    with database_session(settings) as session:
        contents = job_contents(session, job_id)
        engine = session.get_bind()
        session.close()  # purge_job runs its own transactions on the same database
        name = f" ({contents.name})" if contents.name else ""
        if not yes:
            click.confirm(f"Delete job {job_id}{name}: {contents.items} item(s) and "
                          f"{contents.images} stored image(s)?", abort=True, err=True)
        purged = purge_job(engine, configured_storage(settings), job_id)
    if output == "json":
        click.echo(json.dumps(asdict(purged)))
    else:
        kept = (f"; {purged.kept} image(s) kept, reused by other jobs' items" if purged.kept
                else "")
        kept += f"; {purged.inits} init image(s) deleted" if purged.inits else ""
        click.echo(f"Job {job_id} purged: {purged.items} item(s) and {purged.images} image(s) "
                   f"deleted{kept}")
