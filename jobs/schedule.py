"""Nightly schedules: a prompt file, kept in the database, submitted once per UTC day on a cron.

A schedule stores the prompt file's text and sha256, so a run never depends on the file still
being where it was, and an edited file is a visible change. Each run is a job named
`NAME-YYYY-MM-DD` carrying `(schedule_id, run_day)`; the database holds that pair unique, so
however many schedulers run, and however often they restart, a schedule makes at most one job
a day. The loser of a race finds the winner's job and reports it instead of a second one.

Cron expressions have the usual five fields (minute hour day-of-month month day-of-week) and
are read as Celery's `crontab` reads them (`cron.parse_cron`), whose rule is that a day matches
when its day of month, month and weekday all match. A schedule runs at the first time its cron names on a day (UTC); a
scheduler that was down then catches up later the same day, never for days already past.
Every function takes the time as an argument: nothing here reads the clock.
"""
from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta, timezone
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session

from sdq.core.errors import NotFound, Refused
from sdq.core.jobspec import JobSpec
from sdq.core.params import SEED_LIMIT, draw_seed
from sdq.jobs.cron import Cron, parse_cron, parse_firing_cron
from sdq.core.settings import Settings
from sdq.db import transitions
from sdq.db.models import Item, Job, Schedule
from sdq.db.session import open_database, read_only
from sdq.jobs.adapters import adapter_finder, with_folders
from sdq.images.storage import configured_storage
from sdq.jobs.inits import InitReader, item_images
from sdq.jobs.promptfile import Problem, model_resolver, parse_prompt_file
from sdq.jobs.templates import Expansion

if TYPE_CHECKING:
    from sdq.jobs.submit import RunnerFactory

log = logging.getLogger(__name__)

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,88}")
"""Schedule names: they become job names (`NAME-YYYY-MM-DD`, at most 100 characters)."""
_SEARCH_DAYS = 5 * 366
"""How far ahead `next_run` looks: far enough for "29 February, on a Monday"."""

Clock = Callable[[], datetime]


def utc_clock() -> datetime:
    return datetime.now(timezone.utc)


def first_run_on(cron: Cron, day: date) -> datetime | None:
    """The first time `cron` names on the UTC `day`, or None when the day does not match."""
    if (day.month in cron.month_of_year and day.day in cron.day_of_month
            and day.isoweekday() % 7 in cron.day_of_week):
        return datetime.combine(day, time(min(cron.hour), min(cron.minute)), timezone.utc)
    return None


def next_run(cron: Cron, after: datetime) -> datetime | None:
    """The first run time strictly after `after` (one per day), None if none in five years."""
    start = after.astimezone(timezone.utc).date()
    for offset in range(_SEARCH_DAYS):
        at = first_run_on(cron, start + timedelta(days=offset))
        if at is not None and at > after:
            return at
    return None


def run_name(schedule_name: str, day: date) -> str:
    return f"{schedule_name}-{day.isoformat()}"


class ScheduleError(Refused):
    """A schedule operation refused, with the reason as its message."""


@dataclass(frozen=True)
class Added:
    """What `add_schedule` did: `outcome` is added, unchanged, replaced or re-enabled."""

    schedule: Schedule
    outcome: str
    previous_sha256: str | None = None
    warnings: list[Problem] = field(default_factory=list)


def add_schedule(session: Session, *, name: str, cron: str, source: str, data: bytes,
                 spec: JobSpec, replace: bool = False,
                 now: datetime | None = None, wildcards: Path | None = None,
                 lora_dirs: Sequence[Path] = (), embeddings_dir: Path | None = None,
                 inits: InitReader | None = None) -> Added:
    """Validate and store (in the session's transaction) a schedule of the prompt file `data`,
    its runs' options `spec` stored as JSON (`JobSpec.to_json`).

    The file is parsed as `sdq submit` would (PromptFileError lists its problems), its
    templates expanded as `spec.expansion` says, wildcard files read from `wildcards`, LoRAs
    and embeddings found in the spec's folders, else `lora_dirs` and `embeddings_dir`;
    the lines read are stored, so that runs never read the folder. Init images are read by
    `inits` (its folder, that of the file, is stored for the runs, which read the images again
    and store what changed, as `sdq submit` does). A name that
    exists is left as it is unless it is identical (a removed one is then re-enabled) or
    `replace` is given; otherwise ScheduleError says what differs.
    """
    if not NAME_PATTERN.fullmatch(name):
        raise ScheduleError(f"schedule name {name!r}: use up to 89 letters, digits, '.', '_' "
                            "or '-', starting with a letter or digit")
    parse_firing_cron(cron)
    existing = session.scalar(select(Schedule).where(Schedule.name == name))
    spec = _seeded(spec, JobSpec.from_json(existing.options) if existing else JobSpec())
    expansion = Expansion.from_json(spec.expansion or {}, wildcards)
    parsed = parse_prompt_file(data, source, spec.row_defaults(),
                               resolve_model=model_resolver(session), expansion=expansion,
                               adapters=adapter_finder(spec, lora_dirs, embeddings_dir),
                               inits=inits)
    if parsed.inits and inits is not None:
        spec = dataclasses.replace(spec, init_base=str(inits.base.resolve()))
    if spec.expansion is not None:  # with the lines of the wildcard files it read
        spec = dataclasses.replace(spec, expansion=expansion.to_json())
    values = {"cron": cron, "prompt_file_name": source, "prompt_text": data.decode("utf-8"),
              "prompt_sha256": parsed.sha256, "options": spec.to_json()}
    if existing is None:
        schedule = Schedule(name=name, enabled=True, **values)
        if now is not None:
            schedule.created_at = now
        session.add(schedule)
        session.flush()
        return Added(schedule, "added", warnings=parsed.warnings)
    previous = existing.prompt_sha256
    changes = _changes(existing, values)
    if changes and not replace:
        raise ScheduleError(f"schedule {name!r} exists and would change: {'; '.join(changes)}; "
                            "pass --replace to replace it")
    outcome = "replaced" if changes else ("unchanged" if existing.enabled else "re-enabled")
    for key, value in values.items():
        setattr(existing, key, value)
    existing.enabled = True
    session.flush()
    return Added(existing, outcome, previous if previous != parsed.sha256 else None,
                 parsed.warnings)


def _seeded(spec: JobSpec, before: JobSpec) -> JobSpec:
    """The spec with the seed policy settled: `same` when a --seed is given, else `fresh`;
    `same` and `add` without a --seed get a base seed drawn once (kept when the schedule is
    added again), and a random expansion its draws' seed alike."""
    policy = spec.seed_policy or ("same" if spec.seed is not None else "fresh")
    if policy == "fresh" and spec.seed is not None:
        raise ScheduleError("--seed with --seed-policy fresh: a fresh policy draws a new base "
                            "seed each run; use --seed-policy same or add to keep one")
    defaults, expansion = dict(spec.defaults), spec.expansion
    if policy != "fresh" and spec.seed is None:
        kept = before.seed if before.seed_policy == policy else None
        defaults["seed"] = kept if kept is not None else draw_seed(SEED_LIMIT // 2)
    if expansion is not None and expansion.get("seed") is None:
        kept = (before.expansion or {}).get("seed")
        expansion = {**expansion, "seed": kept if kept is not None else draw_seed()}
    return dataclasses.replace(spec, seed_policy=policy, defaults=defaults, expansion=expansion)


def _changes(schedule: Schedule, values: Mapping[str, Any]) -> list[str]:
    changes = []
    if schedule.prompt_sha256 != values["prompt_sha256"]:
        changes.append(f"prompt file sha256 {schedule.prompt_sha256[:12]} -> "
                       f"{values['prompt_sha256'][:12]}")
    if schedule.cron != values["cron"]:
        changes.append(f"cron {schedule.cron!r} -> {values['cron']!r}")
    if schedule.options != values["options"]:
        changes.append(f"options {schedule.options} -> {values['options']}")
    return changes


def find_schedule(session: Session, name: str) -> Schedule:
    schedule = session.scalar(select(Schedule).where(Schedule.name == name))
    if schedule is None:
        raise NotFound(f"no schedule named {name!r}")
    return schedule


def disable_schedule(session: Session, name: str) -> None:
    """Stop running the schedule, keeping it and the link of its runs (`export --schedule`
    still finds them); `add_schedule` with the same file and options enables it again."""
    find_schedule(session, name).enabled = False
    session.flush()


def remove_schedule(session: Session, name: str) -> int:
    """Delete the schedule. The jobs of its runs stay, as jobs of no schedule (their names
    still say which schedule and day made them); how many there were."""
    schedule = find_schedule(session, name)
    of_it = Job.schedule_id == schedule.id
    runs = session.scalar(select(func.count()).select_from(Job).where(of_it)) or 0
    session.execute(update(Job).where(of_it).values(schedule_id=None, run_day=None)
                    .execution_options(synchronize_session=False))
    session.delete(schedule)
    session.flush()
    return runs


def schedules_with_last_run(session: Session) -> list[tuple[Schedule, date | None, int | None]]:
    """Every schedule by name, with the day of its latest run and that run's job (None, None
    when it never ran)."""
    last = (select(Job.schedule_id, func.max(Job.run_day).label("day"))
            .where(Job.schedule_id.is_not(None)).group_by(Job.schedule_id).subquery())
    rows = session.execute(
        select(Schedule, last.c.day, Job.id)
        .outerjoin(last, last.c.schedule_id == Schedule.id)
        .outerjoin(Job, (Job.schedule_id == Schedule.id) & (Job.run_day == last.c.day))
        .order_by(Schedule.name))
    return [(schedule, day, job_id) for schedule, day, job_id in rows]


def run_of(session: Session, schedule_id: int, day: date) -> int | None:
    """The id of the schedule's job for `day`, if it has run that day."""
    return session.scalar(select(Job.id).where(Job.schedule_id == schedule_id,
                                               Job.run_day == day))


_POLICY_TEXT = {
    "same": "the same seeds every run (a run repeats the images it already has at no cost, "
            "through the result cache)",
    "fresh": "a fresh random base seed every run (each run's is recorded with its job)",
    "add": "every run moves each image's seed on by the images of a run, adding new images "
           "of every prompt",
}


def describe_schedule(session: Session, schedule: Schedule) -> list[str]:
    """How a schedule's images were made, as markdown lines for a dataset card: its cron,
    prompt file (the template itself), seed policy, expansion, and runs."""
    options = schedule.options
    runs = session.execute(select(Job.run_day, Job.id).where(Job.schedule_id == schedule.id)
                           .order_by(Job.run_day)).all()
    reused = session.scalar(select(func.count()).select_from(Item).join(Job).where(
        Job.schedule_id == schedule.id, Item.reused_from.is_not(None))) or 0
    span = f"{len(runs)} run(s), {runs[0][0]} to {runs[-1][0]}" if runs else "no runs yet"
    lines = [
        f"Generated by the sdq schedule `{schedule.name}` (cron `{schedule.cron}`, UTC): "
        f"{span} (jobs {', '.join(str(job) for _, job in runs) or 'none'}). Each image is "
        "exported once, with the row of the run that made it; later runs' items that reused "
        f"it ({reused}) are left out.", "",
        f"Seed policy `{options.get('seed_policy', 'fresh')}`: "
        f"{_POLICY_TEXT[options.get('seed_policy', 'fresh')]}.",
    ]
    expansion = options.get("expansion")
    if expansion:
        grid = "; ".join(f"{name} = {', '.join(map(str, values))}"
                         for name, values in expansion.get("grid", {}).items())
        lines += ["", f"Templates expanded {expansion.get('mode', 'combinatorial')}"
                  + (f" ({expansion.get('draws', 1)} draw(s) per row)"
                     if expansion.get("mode") == "random" else "")
                  + (f"; grid: {grid}" if grid else "")
                  + (f"; wildcards: {', '.join(sorted(expansion.get('wildcards', {})))}"
                     if expansion.get("wildcards") else "") + "."]
    lines += ["", f"Prompt file `{schedule.prompt_file_name}` (sha256 "
              f"`{schedule.prompt_sha256}`):", "", "```", schedule.prompt_text.rstrip(), "```",
              "", "Each image's `template` and `template_values` columns say which template "
              "and which choices made it."]
    return lines


def runs_before(session: Session, schedule_id: int, day: date) -> int:
    """How many runs the schedule made before `day`: the `add` policy's repeat number."""
    return session.scalar(select(func.count()).select_from(Job).where(
        Job.schedule_id == schedule_id, Job.run_day < day)) or 0


def due_runs(session: Session, now: datetime) -> list[tuple[Schedule, date]]:
    """The enabled schedules whose run time today (UTC) has come, that have not run today and
    existed at that time."""
    due = []
    day = now.astimezone(timezone.utc).date()
    for schedule in session.scalars(select(Schedule).where(Schedule.enabled)
                                    .order_by(Schedule.name)):
        at = first_run_on(parse_cron(schedule.cron), day)
        if (at is not None and schedule.created_at <= at <= now
                and run_of(session, schedule.id, day) is None):
            due.append((schedule, day))
    return due


@dataclass(frozen=True)
class Run:
    """One schedule's run for one day: `created` is False when it existed already."""

    schedule: str
    day: date
    job_id: int
    created: bool
    items: int = 0


def run_schedule(settings: Settings, name: str, day: date, *, attempts: int = 3,
                 make_runner: RunnerFactory | None = None) -> Run:
    """Create (and, with no broker, run here on a runner from `make_runner`) the schedule's
    job for `day`, unless it exists.

    The job and its items are recorded by `submit` in one transaction; the database refuses a
    second job for the same (schedule, day), in which case the existing one is returned.
    Raises NotFound (no such schedule), PromptFileError (the stored file no longer passes,
    e.g. a model it names was removed) or ModelNotFound.
    """
    from sdq.jobs.submit import identify_model, job_safety_checker, new_job, submit

    engine = open_database(settings.database_url)
    try:
        # Only reads, some beside slow work (init images read and hashed, from S3 too; LoRA,
        # embedding and model files hashed): on SQLite no write lock is held over them.
        with Session(read_only(engine), expire_on_commit=False) as session:
            schedule = find_schedule(session, name)
            if (existing := run_of(session, schedule.id, day)) is not None:
                return Run(name, day, existing, created=False)
            spec = JobSpec.from_json(schedule.options)
            policy = spec.seed_policy or "fresh"
            expansion = Expansion.from_json(spec.expansion or {})
            if policy == "fresh":
                expansion = dataclasses.replace(expansion, seed=draw_seed())
            repeat = runs_before(session, schedule.id, day) if policy == "add" else 0
            # The schedule's own folders, where it names them, for finding and (with no
            # broker) for running.
            settings = with_folders(settings, spec.lora_dirs, spec.embeddings_dir)
            inits = InitReader(spec.init_base or ".", storage=partial(configured_storage, settings),
                               item_image=item_images(session))
            parsed = parse_prompt_file(schedule.prompt_text.encode("utf-8"),
                                       schedule.prompt_file_name, spec.row_defaults(),
                                       resolve_model=model_resolver(session),
                                       expansion=expansion, repeat=repeat,
                                       adapters=adapter_finder(spec, settings.lora_dir,
                                                               settings.embeddings_dir),
                                       inits=inits)
            model = identify_model(spec.model or settings.model, settings.home / "hashes.json",
                                   session) if spec.model or parsed.needs_default_model else None
        checker = job_safety_checker(spec.safety_checker, settings.safety_checker)
        recorded = {**schedule.options, "base_seed": parsed.base_seed, "repeat": repeat,
                    "expansion": expansion.to_json()}
        for attempt in range(attempts):
            job = new_job(spec, parsed, name=run_name(name, day), defaults=recorded,
                          safety_checker=checker, schedule_id=schedule.id, run_day=day)
            try:
                submission = submit(settings, parsed.items, model=model, job=job,
                                    batch_size=spec.batch_size, make_runner=make_runner,
                                    inits=parsed.inits)
            except (IntegrityError, OperationalError):
                # Another scheduler got there first (the unique pair refused this job), or,
                # on SQLite, its write made this transaction's snapshot stale: look again. A
                # job that is this one (recorded, then its in-process run failed) is an error.
                with Session(engine) as session:
                    existing = run_of(session, schedule.id, day)
                if existing is not None and existing != job.id:
                    return Run(name, day, existing, created=False)
                if existing is not None or attempt == attempts - 1:
                    raise
                continue
            with Session(engine) as session, session.begin():
                transitions.mark_schedule_ran(session, schedule.id, day)
            return Run(name, day, submission.job_id, created=True, items=submission.items)
        raise AssertionError("unreachable")
    finally:
        engine.dispose()


def run_due(settings: Settings, now: datetime, make_runner: RunnerFactory | None = None) -> list[Run]:
    """Run every schedule due at `now` (with no broker, here, on runners from `make_runner`);
    one failing schedule is logged and retried next time."""
    engine = open_database(settings.database_url)
    try:
        with Session(engine) as session:
            due = [(schedule.name, day) for schedule, day in due_runs(session, now)]
    finally:
        engine.dispose()
    runs = []
    for name, day in due:
        try:
            run = run_schedule(settings, name, day, make_runner=make_runner)
        except Exception:
            log.exception("schedule %s: the run of %s failed", name, day)
            continue
        log.info("schedule %s: %s job %d for %s", name,
                 "started" if run.created else "found", run.job_id, day)
        runs.append(run)
    return runs


def seconds_to_next_run(settings: Settings, now: datetime) -> float | None:
    """Seconds from `now` to the earliest next run of an enabled schedule (None: none)."""
    engine = open_database(settings.database_url)
    try:
        with Session(engine) as session:
            crons = session.scalars(select(Schedule.cron).where(Schedule.enabled)).all()
    finally:
        engine.dispose()
    times = [at for cron in crons if (at := next_run(parse_cron(cron), now)) is not None]
    return (min(times) - now).total_seconds() if times else None
