"""`sdq schedule` (nightly prompt files) and `sdq scheduler` (the process that runs them)."""
from __future__ import annotations

import json
import logging
import time
from datetime import datetime, timedelta, timezone
from functools import partial
from pathlib import Path
from typing import Any

import click

from sdq.cli.common import (
    configured_storage,
    database_session,
    emit,
    load_settings,
    output_options,
    plain,
    report,
)
from sdq.cli.errors import BAD_INPUT, FAILED, CommandFailed, Reported
from sdq.cli.options import (
    TAG,
    as_option_errors,
    check_on_flag,
    expansion_of,
    adapter_options,
    generation_options,
    safety_options,
    template_options,
)
from sdq.core.init_image import DEFAULT_STRENGTH
from sdq.core.jobspec import ON_FLAG, PRIORITIES, SEED_POLICIES, JobSpec
from sdq.core.params import MAX_IMAGES_PER_ROW
from sdq.core.settings import SAFETY_OFF
from sdq.db.models import Schedule
from sdq.jobs.cron import parse_firing_cron
from sdq.jobs.inits import InitReader, item_images
from sdq.jobs.promptfile import PromptFileError, recorded_name
from sdq.jobs.schedule import (
    NAME_PATTERN,
    Clock,
    Run,
    add_schedule,
    disable_schedule,
    next_run,
    parse_cron,
    remove_schedule,
    run_schedule,
    schedules_with_last_run,
    utc_clock,
)

_COLUMNS = ["name", "cron", "file", "sha", "enabled", "next_run", "last_run", "last_job"]


def _name(ctx: click.Context, param: click.Parameter, value: str) -> str:
    if not NAME_PATTERN.fullmatch(value):
        raise click.BadParameter(f"{value!r}: use up to 89 letters, digits, '.', '_' or '-', "
                                 "starting with a letter or digit")
    return value


def _cron(ctx: click.Context, param: click.Parameter, value: str) -> str:
    try:
        parse_firing_cron(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    return " ".join(value.split())


@click.group()
def schedule() -> None:
    """Submit a prompt file every day on a cron, as one job per day named NAME-YYYY-MM-DD.

    The file's text is stored with the schedule (and its sha256 shown by `list`), so editing
    the file later changes nothing until `add --replace`. `sdq scheduler` runs the schedules.

    \b
    Examples:
      sdq schedule add nightly --cron "0 2 * * *" prompts.csv --model v1-5-pruned-emaonly.safetensors -n 4
      sdq schedule list
      sdq schedule run-now nightly
      sdq schedule disable nightly
    """


@schedule.command("add")
@click.argument("name", callback=_name)
@click.option("--cron", required=True, callback=_cron,
              help='When to run, in UTC: "MINUTE HOUR DAY-OF-MONTH MONTH DAY-OF-WEEK".')
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--model", "-m", "model_ref", metavar="REF",
              help="Checkpoint (.safetensors/.ckpt), diffusers folder or Hugging Face repo id "
                   "[default: $SDQ_MODEL of the scheduler].")
@generation_options("Base seed; the same every day (--seed-policy same or add).",
                    scope=" For rows without one.", fill_defaults=False)
@click.option("--seed-policy", type=click.Choice(SEED_POLICIES),
              help="same: the same seeds each night (the result cache makes a re-run free); "
                   "fresh: a new random base seed each night (recorded); add: each night N new "
                   "images of every prompt (N = its images per night) [default: same with "
                   "--seed, else fresh].")
@template_options
@click.option("-n", "--num-images", type=click.IntRange(1, MAX_IMAGES_PER_ROW),
              help="Images per row without an `n` [default: 1].")
@click.option("--strength", type=float, metavar="F",
              help="Denoising strength of rows with an init_image and none of their own, in "
                   f"(0, 1] [default: {DEFAULT_STRENGTH}].")
@click.option("--batch-size", type=click.IntRange(1), help="Images denoised together.")
@click.option("--priority", type=click.IntRange(PRIORITIES.start, PRIORITIES.stop - 1),
              help="0-9, each run's job priority (see `sdq submit --help`).")
@click.option("--tag", "tags", multiple=True, type=TAG, help="A tag for each run's job (repeatable).")
@adapter_options
@safety_options(fill_defaults=False)
@click.option("--replace", is_flag=True, help="Replace a schedule of this name that differs.")
@output_options("json")
def add(name: str, cron: str, file: Path, model_ref: str | None, negative_prompt: str | None,
        seed: int | None, sampler: str | None, steps: int | None, cfg: float | None,
        eta: float | None, width: int | None, height: int | None,
        prompt_syntax: str | None, clip_skip: int | None, loras: tuple[str, ...],
        lora_dirs: tuple[Path, ...], embeddings_dir: Path | None, seed_policy: str | None, grid: tuple[str, ...], wildcards: Path | None, expand: str,
        draws: int, expand_seed: int | None, num_images: int | None, strength: float | None,
        batch_size: int | None,
        priority: int | None, tags: tuple[str, ...], safety_checker: str | None,
        on_flag: str | None, replace: bool, output: str | None) -> None:
    """Schedule the prompt FILE (checked now, as `sdq submit` checks it) under NAME.

    Options are the defaults `sdq submit` takes. Adding a NAME that exists with the same
    file and options changes nothing (and re-enables a removed one); a changed file, cron or
    option is refused unless --replace.

    \b
    Example:
      sdq schedule add nightly --cron "0 2 * * *" prompts.csv --model v1-5-pruned-emaonly.safetensors -n 4 --tag nightly
    """
    from sdq.jobs.submit import identify_model, job_safety_checker

    settings = load_settings(need_broker=False)
    if model_ref is not None:
        if Path(model_ref).expanduser().exists():
            model_ref = str(Path(model_ref).expanduser().resolve())
        with database_session(settings) as session:
            try:
                identify_model(model_ref, settings.home / "hashes.json", session)
            except (ValueError, LookupError, OSError) as exc:
                raise CommandFailed.of(exc, "--model", code=BAD_INPUT) from None
    if safety_checker is not None:  # `off` is kept: the scheduler's default must not apply
        try:
            safety_checker = job_safety_checker(safety_checker, None) or SAFETY_OFF
        except ValueError as exc:
            raise CommandFailed.of(exc, "--safety-checker", code=BAD_INPUT) from None
    wildcards = wildcards or settings.wildcards
    expansion = None
    if grid or wildcards or expand != "combinatorial" or expand_seed is not None:
        # Stored with the wildcard lines it reads: a run never reads the folder again.
        expansion = expansion_of(grid, wildcards, expand, draws, expand_seed).to_json()
    if safety_checker == SAFETY_OFF:
        check_on_flag(on_flag, None)
    elif safety_checker is None and settings.safety_checker is None and on_flag not in (None, ON_FLAG[0]):
        # The scheduler's own SDQ_SAFETY_CHECKER is its default: not known here.
        click.echo(f"Warning: --on-flag {on_flag} does nothing unless the scheduler has a safety "
                   "checker (SDQ_SAFETY_CHECKER): none is given here", err=True)
    with as_option_errors():
        spec = JobSpec(
            model=model_ref, batch_size=batch_size, priority=priority, tags=tags,
            safety_checker=safety_checker, on_flag=on_flag, seed_policy=seed_policy,
            expansion=expansion, loras=loras,
            lora_dirs=tuple(str(p.resolve()) for p in lora_dirs),
            embeddings_dir=str(embeddings_dir.resolve()) if embeddings_dir else None,
            defaults={"negative_prompt": negative_prompt, "sampler": sampler, "steps": steps,
                      "cfg": cfg, "eta": eta, "width": width, "height": height,
                      "n": num_images, "seed": seed, "prompt_syntax": prompt_syntax,
                      "clip_skip": clip_skip, "strength": strength})
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise CommandFailed(f"cannot read {file}: {exc.strerror or exc}", BAD_INPUT) from None
    with database_session(settings) as session:
        try:
            with as_option_errors():
                added = add_schedule(session, name=name, cron=cron, source=recorded_name(file), data=data,
                                     spec=spec, replace=replace, wildcards=wildcards,
                                     lora_dirs=settings.lora_dir,
                                     embeddings_dir=settings.embeddings_dir,
                                     inits=InitReader(file.parent,
                                                      storage=lambda: configured_storage(settings),
                                                      item_image=item_images(session)))
        except PromptFileError as exc:
            for problem in exc.problems:
                click.echo(str(problem), err=True)
            click.echo(f"{file}: {len(exc.problems)} problem(s); nothing was scheduled", err=True)
            raise Reported(exc) from None
        for warning in added.warnings:
            click.echo(f"Warning: {warning}", err=True)
        session.commit()
        record = _record(added.schedule, None, None, utc_clock())
    if output == "json":
        click.echo(json.dumps({"outcome": added.outcome, **{k: plain(v) for k, v in record.items()}},
                              indent=2, ensure_ascii=False))
        return
    change = (f"; prompt file changed {added.previous_sha256[:12]} -> {record['sha']}"
              if added.previous_sha256 else "")
    click.echo(f"schedule {name} {added.outcome}{change}: {cron} (UTC), file sha256 "
               f"{record['sha']}, next run {plain(record['next_run']) or 'never'}")


def _record(schedule: Schedule, last_day: Any, last_job: int | None,
            now: datetime) -> dict[str, Any]:
    upcoming = next_run(parse_cron(schedule.cron), now) if schedule.enabled else None
    return {
        "name": schedule.name, "cron": schedule.cron, "file": schedule.prompt_file_name,
        "sha": schedule.prompt_sha256[:12], "sha256": schedule.prompt_sha256,
        "enabled": schedule.enabled, "next_run": upcoming,
        "last_run": last_day.isoformat() if last_day else None, "last_job": last_job,
        "options": schedule.options, "created": schedule.created_at,
    }


@schedule.command("list")
@output_options("json")
def list_(output: str | None) -> None:
    """The schedules, their prompt file's sha256 prefix, next run and last run (UTC).

    \b
    Example:
      sdq schedule list --json
    """
    with database_session() as session:
        now = utc_clock()
        records = [_record(schedule, day, job_id, now)
                   for schedule, day, job_id in schedules_with_last_run(session)]
    emit(records, _COLUMNS, output, empty="no schedules")


@schedule.command("disable")
@click.argument("name")
@output_options("json")
def disable(name: str, output: str | None) -> None:
    """Stop running NAME, keeping it: `schedule list` shows it disabled, its runs stay linked
    to it (`export --schedule`), and `schedule add` with the same file enables it again.

    \b
    Example:
      sdq schedule disable nightly
    """
    with database_session() as session:
        disable_schedule(session, name)
        session.commit()
    report({"schedule": name, "outcome": "disabled"},
           f"schedule {name} disabled (`schedule add` with the same file enables it again)",
           output)


@schedule.command("remove")
@click.argument("name")
@output_options("json")
def remove(name: str, output: str | None) -> None:
    """Delete the schedule NAME. The jobs of its runs stay, as jobs of no schedule (their
    names say which schedule and day made them; `export --schedule` no longer finds them:
    `schedule disable` keeps the link).

    \b
    Example:
      sdq schedule remove nightly
    """
    with database_session() as session:
        runs = remove_schedule(session, name)
        session.commit()
    report({"schedule": name, "outcome": "removed", "jobs": runs},
           f"schedule {name} removed; its {runs} job(s) stay, as jobs of no schedule", output)


@schedule.command("run-now")
@click.argument("name")
@output_options("json")
def run_now(name: str, output: str | None) -> None:
    """Start today's (UTC) run of NAME now instead of at its cron time; refused if it has
    run today already (one run a day). With no broker, it runs here.

    \b
    Example:
      sdq schedule run-now nightly
    """
    from sdq.worker.factory import runner_from_settings

    settings = load_settings(need_broker=False)
    try:
        run = run_schedule(settings, name, utc_clock().date(), make_runner=runner_from_settings)
    except ValueError as exc:
        raise CommandFailed.of(exc, code=FAILED) from None
    if output == "json":
        click.echo(json.dumps(_run_record(run), indent=2))
    if not run.created:
        raise click.ClickException(f"{name} already ran on {run.day}: job {run.job_id}")
    if output != "json":
        click.echo(f"job {run.job_id} ({name}-{run.day}): {run.items} item(s)")


def _run_record(run: Run) -> dict[str, Any]:
    return {"schedule": run.schedule, "day": run.day.isoformat(), "job": run.job_id,
            "created": run.created, "items": run.items}


def _fixed_start_clock(start: datetime) -> Clock:
    """A clock that starts at `start` and then runs at the real pace."""
    origin = time.monotonic()
    return lambda: start + timedelta(seconds=time.monotonic() - origin)


def _utc_instant(ctx: click.Context, param: click.Parameter, value: str | None
                 ) -> datetime | None:
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(f"expected an ISO 8601 time, got {value!r}") from None
    return parsed.replace(tzinfo=parsed.tzinfo or timezone.utc).astimezone(timezone.utc)


@click.command()
@click.option("--once", is_flag=True, help="Start what is due now, then exit (for cron/CI).")
@click.option("--max-interval", type=click.IntRange(1), default=60, show_default=True,
              help="Seconds between looks at the database for new or changed schedules.")
@click.option("--now", "start", callback=_utc_instant, hidden=True,
              help="Test only: pretend the clock starts at this UTC time.")
def scheduler(once: bool, max_interval: int, start: datetime | None) -> None:
    """Run the schedules: Celery beat, reading the schedules from the database.

    Each due schedule becomes that day's job (enqueued for the workers; with no broker it is
    generated here). Any number of schedulers may run: the database allows one job per
    schedule and day, so a second scheduler or a restart never repeats a run. A scheduler
    that was down at run time catches up later the same UTC day.

    \b
    Example:
      sdq scheduler            # in docker-compose.yml: the `scheduler` service
    """
    from celery.beat import Service

    from sdq.jobs.broker import create_app
    from sdq.worker.beat import DatabaseScheduler

    settings = load_settings(need_broker=False)
    with database_session(settings):
        pass  # the database is reachable and at the right schema, or one readable line
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("sdq").setLevel(logging.INFO)
    clock = utc_clock if start is None else _fixed_start_clock(start)
    app = create_app(settings)
    if once:
        ticker = DatabaseScheduler(app, settings=settings, clock=clock, max_interval=max_interval)
        ticker.tick()
        for run in ticker.last_runs:
            click.echo(json.dumps(_run_record(run)))
        return
    mode = "embedded: runs generate here" if settings.embedded else "runs go to the broker"
    click.echo(f"sdq scheduler ({mode}); Ctrl-C to stop", err=True)
    Service(app, max_interval=max_interval,
            scheduler_cls=partial(DatabaseScheduler, settings=settings, clock=clock)).start()
