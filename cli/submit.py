"""`sdq submit`: a prompt file in, a job out; run here (embedded) or enqueued for workers."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from sdq.cli.common import (
    database_session,
    follow,
    load_settings,
    outcome,
    output_options,
    recorded_bar,
    render_table,
)
from sdq.cli.errors import BAD_INPUT, CommandFailed
from sdq.cli.options import TAG, as_option_errors, generation_options
from sdq.db.models import Job
from sdq.db.queries import find_model
from sdq.sdmodel.params import MAX_IMAGES_PER_ROW
from sdq.worker.app import PRIORITIES
from sdq.worker.jobs.promptfile import Defaults, PromptFile, PromptFileError, read_prompt_file
from sdq.worker.jobs.submit import DEFAULT_BATCH_SIZE

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from sdq.worker.jobs.submit import ModelIdentity


@click.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--model", "-m", "model_ref", metavar="REF",
              help="Model of rows without a `model`: checkpoint, diffusers folder or Hugging "
                   "Face repo id [default: $SDQ_MODEL, else SD v1.5 from the HF cache].")
@generation_options("Base seed: image i of the job without a seed of its own gets seed+i "
                    "[default: random, recorded with the job].", scope=" For rows without one.")
@click.option("-n", "--num-images", type=click.IntRange(1, MAX_IMAGES_PER_ROW),
              default=1, show_default=True, help="Images per row without an `n`.")
@click.option("--batch-size", type=click.IntRange(1),
              help=f"Images per batch [default: $SDQ_BATCH_SIZE, else {DEFAULT_BATCH_SIZE}].")
@click.option("--name", help="Job name [default: the file name].")
@click.option("--priority", type=click.IntRange(PRIORITIES.start, PRIORITIES.stop - 1), default=0,
              show_default=True, help="0-9: idle workers take the highest-priority job's batches first.")
@click.option("--tag", "tags", multiple=True, type=TAG, help="A tag for the job; repeatable.")
@click.option("--dry-run", is_flag=True,
              help="Check the file and print the plan; record and run nothing.")
@click.option("--yes", "-y", is_flag=True,
              help="Submit more images than SDQ_CONFIRM_ITEMS (default 10,000) without asking.")
@click.option("--wait", is_flag=True,
              help="With a broker: follow the job's progress until it is done.")
@output_options("json")
def submit(file: Path, model_ref: str | None, negative_prompt: str, seed: int | None,
           sampler: str, steps: int, cfg: float, eta: float, width: int, height: int,
           num_images: int,
           batch_size: int | None, name: str | None, priority: int, tags: tuple[str, ...],
           dry_run: bool, yes: bool, wait: bool, output: str | None) -> None:
    """Submit the prompts of FILE (CSV, JSON Lines or plain text) as one job.

    The whole file is checked first; every problem is listed as FILE:LINE: field: reason,
    with exit status 2, and nothing is recorded. The options fill what rows leave out; more
    than SDQ_CONFIRM_ITEMS images (default 10,000) need --yes. With
    no broker (SDQ_BROKER_URL unset) the job runs here with a progress bar; with one it is
    enqueued for `sdq worker`s and the job id printed (`--wait` follows it). Exit status 1
    if any image failed.

    \b
    Examples:
      sdq submit prompts.csv --model v1-5-pruned-emaonly.safetensors --steps 25 -n 4
      sdq submit prompts.txt --seed 42 --dry-run
      sdq submit nightly.jsonl --tag nightly --json --wait
    """
    from sdq.worker.jobs.submit import check_size, identify_model, plan

    as_json = output == "json"
    with as_option_errors():
        defaults = Defaults(negative_prompt=negative_prompt, seed=seed, n=num_images, steps=steps,
                            cfg=cfg, eta=eta, sampler=sampler, width=width, height=height)
    settings = load_settings(need_broker=False)
    with database_session(settings) as session:
        parsed = _parse(file, defaults, session)
    for warning in parsed.warnings:
        click.echo(f"Warning: {warning}", err=True)
    if not dry_run:
        check_size(len(parsed.items), settings.confirm_items, confirmed=yes)
    ref = model_ref or settings.model
    try:
        model = identify_model(ref, settings.home / "hashes.json")
    except (ValueError, LookupError, OSError) as exc:
        raise CommandFailed.of(exc, "--model", code=BAD_INPUT) from None
    size = batch_size or settings.batch_size or DEFAULT_BATCH_SIZE
    if dry_run:
        with database_session(settings) as session:
            groups = plan(session, parsed.items, model, size)
        _print_plan(file, parsed, size, groups, as_json)
        return
    job = Job(name=name or file.name, source_name=str(file), source_sha256=parsed.sha256,
              defaults={**defaults.to_json(), "base_seed": parsed.base_seed, "model": model.recorded_ref(ref),
                        "batch_size": size},
              priority=priority, tags=list(dict.fromkeys(tags)))
    result, status = _submit(settings, parsed, model, job, size, as_json)
    if wait and result["queues"]:
        record, text, status = outcome(result["job_id"], follow(settings, result["job_id"],
                                                                queues=result["queues"]))
        result["counts"] = record["counts"]
        if not as_json:
            click.echo(text)
    if as_json:
        click.echo(json.dumps(result))
    sys.exit(status)


def _parse(file: Path, defaults: Defaults, session: Session) -> PromptFile:
    """The accepted file, or every problem on stderr and exit status 2."""
    def resolve(name: str) -> int | None:
        found = find_model(session, name)
        return found.id if found else None

    try:
        return read_prompt_file(file, defaults, resolve_model=resolve)
    except PromptFileError as exc:
        for problem in exc.problems:
            click.echo(str(problem), err=True)
        click.echo(f"{file}: {len(exc.problems)} problem(s); nothing was submitted", err=True)
        sys.exit(2)
    except OSError as exc:
        raise CommandFailed(f"cannot read {file}: {exc.strerror or exc}", BAD_INPUT) from None


def _submit(settings: Any, parsed: PromptFile, model: ModelIdentity, job: Job, size: int,
            as_json: bool) -> tuple[dict[str, Any], int]:
    """Record and run (embedded, with a progress bar) or enqueue; the outcome and exit status."""
    from sdq.worker.jobs.submit import submit as submit_items

    submitted: list[int] = []
    with recorded_bar("generating") as start:
        def on_submitted(job_id: int, items: int, batches: int) -> None:
            submitted.append(job_id)
            if settings.embedded:
                click.echo(f"Job {job_id}: {items} image(s) in {batches} batch(es), "
                           "running here", err=True)
                on_recorded.append(start(items, 0))

        on_recorded: list[Any] = []
        try:
            result = submit_items(settings, parsed.items, model=model, job=job,
                                  batch_size=size, on_submitted=on_submitted,
                                  on_recorded=lambda n: on_recorded[0](n), on_step=start.step)
        except KeyboardInterrupt:
            if not submitted:
                raise
            raise click.ClickException(f"interrupted; `sdq resume {submitted[0]}` finishes "
                                       "the job without redoing what is done") from None
    record: dict[str, Any] = {"job_id": result.job_id, "items": result.items,
                              "batches": result.batches, "queues": list(result.queues),
                              "base_seed": parsed.base_seed}
    if result.report is None:
        if not as_json:
            click.echo(f"Job {result.job_id}: {result.items} image(s) in {result.batches} "
                       f"batch(es) enqueued on {', '.join(result.queues)}")
        return record, 0
    report = result.report
    record |= {"done": report.done, "failed": report.failed}
    if not as_json:
        text = f"Job {result.job_id}: {report.done}/{result.items} done"
        if report.failed:
            text += f", {report.failed} failed (`sdq status {result.job_id}` says why)"
        click.echo(text)
    return record, 1 if report.failed else 0


def _print_plan(file: Path, parsed: PromptFile, size: int, plan: list[dict[str, Any]],
                as_json: bool) -> None:
    estimates = [group["estimated_s"] for group in plan]
    total = None if None in estimates else sum(estimates)
    if as_json:
        click.echo(json.dumps({"file": str(file), "format": parsed.format, "rows": parsed.rows,
                               "items": len(parsed.items), "batch_size": size,
                               "batches": sum(g["batches"] for g in plan),
                               "base_seed": parsed.base_seed, "groups": plan,
                               "estimated_s": total}))
        return
    click.echo(f"{file}: {parsed.rows} row(s), {len(parsed.items)} image(s), "
               f"{sum(g['batches'] for g in plan)} batch(es) of up to {size}, "
               f"base seed {parsed.base_seed}")
    click.echo(render_table(plan, ["model", "sampler", "steps", "size", "images", "batches"]))
    if total is None:
        click.echo("estimated time: unknown (no finished images of the same model, sampler and "
                   "size to measure from)")
    else:
        click.echo(f"estimated time: about {total:.0f}s (from the seconds per step of finished "
                   "images of the same model, sampler and size)")
    click.echo("nothing recorded (--dry-run)")
