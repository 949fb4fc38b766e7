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

import logging
import random
import re
from dataclasses import dataclass, field, replace
from datetime import date, datetime, time, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Mapping

from sqlalchemy import func, or_, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session

from sdq.db.models import Item, Job, Schedule
from sdq.db.queries import find_model
from sdq.db.session import open_database
from sdq.core.errors import NotFound, Refused
from sdq.core.params import DEFAULTS, SEED_LIMIT
from sdq.jobs.cron import Cron, parse_cron, parse_firing_cron
from sdq.jobs.promptfile import Defaults, ModelResolver, Problem, parse_prompt_file
from sdq.jobs.templates import Expansion
from sdq.core.settings import Settings

log = logging.getLogger(__name__)

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,88}")
"""Schedule names: they become job names (`NAME-YYYY-MM-DD`, at most 100 characters)."""
DEFAULT_FIELDS = ("n", *DEFAULTS)
"""Options that fill a prompt file's missing fields; the others (model, batch_size, priority,
tags) apply to the job."""
OPTION_NAMES = (*DEFAULT_FIELDS, "model", "batch_size", "priority", "tags", "safety_checker",
                "on_flag", "seed_policy", "expansion")
SEED_POLICIES = ("same", "fresh", "add")
"""How a schedule's runs choose seeds: the same each night (the result cache makes a re-run
free, and it adds what is new when the file grows), a fresh base seed each night (recorded
with the job), or every image's seed moved on by the images of a night, so that each run adds
new images of every prompt."""
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


def prompt_defaults(options: Mapping[str, Any]) -> Defaults:
    return Defaults(**{k: options[k] for k in DEFAULT_FIELDS if options.get(k) is not None})


def model_resolver(session: Session) -> ModelResolver:
    """A prompt file row's `model` as a registered model's id, the way `sdq submit` reads it."""
    def resolve(ref: str) -> int | None:
        model = find_model(session, ref)
        return model.id if model else None
    return resolve


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
                 options: Mapping[str, Any], replace: bool = False,
                 now: datetime | None = None, wildcards: Path | None = None) -> Added:
    """Validate and store (in the session's transaction) a schedule of the prompt file `data`.

    The file is parsed as `sdq submit` would (PromptFileError lists its problems), its
    templates expanded as `options["expansion"]` says, wildcard files read from `wildcards`;
    the lines read are stored, so that runs never read the folder. A name that
    exists is left as it is unless it is identical (a removed one is then re-enabled) or
    `replace` is given; otherwise ScheduleError says what differs.
    """
    if not NAME_PATTERN.fullmatch(name):
        raise ScheduleError(f"schedule name {name!r}: use up to 89 letters, digits, '.', '_' "
                            "or '-', starting with a letter or digit")
    parse_firing_cron(cron)
    options = {k: options[k] for k in OPTION_NAMES if options.get(k) not in (None, [], ())}
    existing = session.scalar(select(Schedule).where(Schedule.name == name))
    options = _seeded(options, existing.options if existing else {})
    expansion = Expansion.from_json(options.get("expansion", {}), wildcards)
    parsed = parse_prompt_file(data, source, prompt_defaults(options),
                               resolve_model=model_resolver(session), expansion=expansion)
    if "expansion" in options:  # with the lines of the wildcard files it read
        options["expansion"] = expansion.to_json()
    values = {"cron": cron, "prompt_file_name": source, "prompt_text": data.decode("utf-8"),
              "prompt_sha256": parsed.sha256, "options": options}
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


def _seeded(options: dict[str, Any], before: Mapping[str, Any]) -> dict[str, Any]:
    """The options with the seed policy settled: `same` when a --seed is given, else `fresh`;
    `same` and `add` without a --seed get a base seed drawn once (kept when the schedule is
    added again), and a random expansion its draws' seed alike."""
    policy = options.setdefault("seed_policy", "same" if "seed" in options else "fresh")
    if policy not in SEED_POLICIES:
        raise ScheduleError(f"unknown seed policy {policy!r}; choose from "
                            f"{', '.join(SEED_POLICIES)}")
    if policy == "fresh" and "seed" in options:
        raise ScheduleError("--seed with --seed-policy fresh: a fresh policy draws a new base "
                            "seed each run; use --seed-policy same or add to keep one")
    draw = random.SystemRandom().randrange
    if policy != "fresh" and "seed" not in options:
        kept = before.get("seed") if before.get("seed_policy") == policy else None
        options["seed"] = kept if kept is not None else draw(SEED_LIMIT // 2)
    expansion = options.get("expansion")
    if expansion is not None and expansion.get("seed") is None:
        kept = (before.get("expansion") or {}).get("seed")
        options["expansion"] = {**expansion, "seed": kept if kept is not None else draw(SEED_LIMIT)}
    return options


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


def remove_schedule(session: Session, name: str) -> bool:
    """Delete the schedule, or disable it when it has runs (their jobs keep pointing at it);
    True when it was deleted."""
    schedule = find_schedule(session, name)
    if session.scalar(select(Job.id).where(Job.schedule_id == schedule.id).limit(1)) is None:
        session.delete(schedule)
        session.flush()
        return True
    schedule.enabled = False
    session.flush()
    return False


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


def run_schedule(settings: Settings, name: str, day: date, *, attempts: int = 3) -> Run:
    """Create (and, with no broker, run here) the schedule's job for `day`, unless it exists.

    The job and its items are recorded by `submit` in one transaction; the database refuses a
    second job for the same (schedule, day), in which case the existing one is returned.
    Raises NotFound (no such schedule), PromptFileError (the stored file no longer passes,
    e.g. a model it names was removed) or ModelNotFound.
    """
    from sdq.jobs.submit import identify_model, job_safety_checker, submit

    engine = open_database(settings.database_url)
    try:
        with Session(engine, expire_on_commit=False) as session:
            schedule = find_schedule(session, name)
            if (existing := run_of(session, schedule.id, day)) is not None:
                return Run(name, day, existing, created=False)
            options = dict(schedule.options)
            policy = options.get("seed_policy", "fresh")
            expansion = Expansion.from_json(options.get("expansion", {}))
            if policy == "fresh":
                expansion = replace(expansion, seed=random.SystemRandom().randrange(SEED_LIMIT))
            repeat = runs_before(session, schedule.id, day) if policy == "add" else 0
            parsed = parse_prompt_file(schedule.prompt_text.encode("utf-8"),
                                       schedule.prompt_file_name, prompt_defaults(options),
                                       resolve_model=model_resolver(session),
                                       expansion=expansion, repeat=repeat)
        model = identify_model(options.get("model") or settings.model,
                               settings.home / "hashes.json")
        for attempt in range(attempts):
            job = Job(name=run_name(name, day), source_name=schedule.prompt_file_name,
                      source_sha256=schedule.prompt_sha256,
                      defaults={**options, "base_seed": parsed.base_seed, "repeat": repeat,
                                "expansion": expansion.to_json()},
                      priority=options.get("priority", 0), tags=options.get("tags", []),
                      schedule_id=schedule.id, run_day=day,
                      safety_checker=job_safety_checker(options.get("safety_checker"),
                                                        settings.safety_checker),
                      on_flag=options.get("on_flag") or "keep")
            try:
                submission = submit(settings, parsed.items, model=model, job=job,
                                    batch_size=options.get("batch_size"))
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
            _mark_ran(engine, schedule.id, day)
            return Run(name, day, submission.job_id, created=True, items=submission.items)
        raise AssertionError("unreachable")
    finally:
        engine.dispose()


def _mark_ran(engine: Engine, schedule_id: int, day: date) -> None:
    """Record the day on the schedule (for display; the jobs' unique pair is the guard)."""
    with Session(engine) as session, session.begin():
        session.execute(update(Schedule).where(
            Schedule.id == schedule_id,
            or_(Schedule.last_run_day.is_(None), Schedule.last_run_day < day),
        ).values(last_run_day=day))


def run_due(settings: Settings, now: datetime) -> list[Run]:
    """Run every schedule due at `now`; one failing schedule is logged and retried next time."""
    engine = open_database(settings.database_url)
    try:
        with Session(engine) as session:
            due = [(schedule.name, day) for schedule, day in due_runs(session, now)]
    finally:
        engine.dispose()
    runs = []
    for name, day in due:
        try:
            run = run_schedule(settings, name, day)
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
