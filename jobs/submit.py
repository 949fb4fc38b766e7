"""Submission: record a job and its items, batch them, then enqueue or run them in-process.

The CLI parses prompt files into item specs and calls `submit`; `lifecycle` re-enqueues
through the same `dispatch`. Items are committed before any message is published, so a worker
can never receive an id that is not in the database yet; a crash between the two leaves items
`pending`, which `reconcile` picks up. The model stack (torch) is imported only by the
functions that hash or run a model, so commands can use the rest without loading it.

Over 400 lines on purpose: the one path from parsed rows to recorded, planned and enqueued
work, with the dry run's planning beside it, so that the estimate uses the keys and the
batching the real run will.
"""
from __future__ import annotations

import json
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date
from itertools import groupby
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping, Sequence

from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement

from sdq.core.errors import InvalidInput, Unavailable
from sdq.core.init_image import InitImage, steps_run
from sdq.core.jobspec import ON_FLAG, PRIORITIES, JobSpec, default_batch_size
from sdq.core.params import (
    HUB_REPO_ID,
    SHAPE_FIELDS,
    BatchShape,
    GenerationParams,
    cache_key,
    short_hash,
)
from sdq.core.settings import Settings, safety_checker_ref
from sdq.db import transitions
from sdq.db.models import Item, Job, Model, Status
from sdq.db.queries import all_models, find_model, seconds_per_step, submit_job
from sdq.db.session import open_database
from sdq.jobs.broker import (
    TASK_NAME,
    broker_priority,
    check_broker,
    create_app,
    queue_name,
)
from sdq.jobs import inits as init_images
from sdq.jobs.inits import InitSource
from sdq.jobs.promptfile import PromptFile

if TYPE_CHECKING:
    from sdq.core.batch import Batch, BatchRunner, RunReport

BATCHES_PER_MESSAGE = 2
"""Batches one message carries: enough for uploads of one to overlap denoising of the next,
few enough that a lost worker's message is redone cheaply."""

RunnerFactory = Callable[[Settings, Engine, str], "BatchRunner"]
"""Builds the runner of an in-process run from the settings, the database and a model
reference: the worker's `runner_from_settings`, handed in by the command (or the worker) that
calls, so that job services never import the worker."""


def check_runner(settings: Settings, make_runner: RunnerFactory | None) -> None:
    """With no broker the batches run here, which needs a runner: a caller's mistake, told
    before anything is recorded."""
    if settings.embedded and make_runner is None:
        raise TypeError("no broker is configured, so the batches run in-process: pass make_runner")


@dataclass(frozen=True)
class ModelIdentity:
    """A model as the queue knows it: how to load it, and the hash that routes its work."""

    ref: str
    sha256: str
    name: str
    architecture: str = "sd-v1"
    local: bool = True
    """A local file or folder (`ref` its absolute path), not a Hugging Face repo id."""

    @property
    def short_hash(self) -> str:
        return short_hash(self.sha256)

    def recorded_ref(self, given: str) -> str:
        """The reference a job records for `given`: a local model's absolute path, a repo id
        as given."""
        return self.ref if self.local else given


def identify_model(ref: str | Path, hash_cache: Path | None = None,
                   session: Session | None = None) -> ModelIdentity:
    """Check a model cheaply and hash it without loading it (cached by path and file identity:
    size, mtime, inode and ctime, `sdmodel.modelfiles.file_identity`);
    raises ModelNotFound, or CheckpointError for what is not a model. A local model's `ref` is
    its absolute path, so the job can be reproduced, retried or resumed from any folder.

    With the database's `session`, a `ref` that is no local file or folder may name a model
    registered there (`sdq models add`: its name, or a prefix of its hash), as a prompt file's
    `model` column does: that model, loaded from where it was registered, not hashed again."""
    from sdq.sdmodel.modelfiles import ModelNotFound, model_sha256, resolve_model_ref

    text = str(ref)
    if session is not None and not Path(text).expanduser().exists():
        if (known := find_model(session, text)) is not None and known.source_uri:
            return ModelIdentity(known.source_uri, known.sha256, known.name, known.architecture)
    try:
        path = resolve_model_ref(ref)
    except ModelNotFound as exc:
        if session is None or not may_be_model_name(text):
            raise
        raise ModelNotFound(f"{exc}, nor a model name: `sdq models list` shows them, "
                            "`sdq models add NAME PATH` adds one") from None
    local = Path(str(ref)).expanduser().exists()
    name = (path.stem if path.is_file() else path.name) if local else str(ref)
    return ModelIdentity(str(path), model_sha256(path, hash_cache), name, local=local)


def may_be_model_name(ref: str) -> bool:
    """Whether `ref` can only mean a registered model (`identify_model` with a session looks it
    up): nothing on disk, and neither a path into a folder, a repo id nor a weights file name.
    Commands that need no database otherwise (`generate`) open it for such a ref only."""
    return ("/" not in ref and Path(ref).suffix.lower() not in (".safetensors", ".ckpt")
            and not Path(ref).expanduser().exists())


def check_size(images: int, limit: int, *, confirmed: bool) -> None:
    """Refuse a submission of more than `limit` images unless the user `confirmed` it (`--yes`):
    a large total is more often a typo in `n` or a template than a plan. InvalidInput, so the
    command exits 2 with nothing recorded."""
    if images > limit and not confirmed:
        raise InvalidInput(f"{images:,} images is more than {limit:,} (SDQ_CONFIRM_ITEMS); "
                           "check it with --dry-run, then pass --yes to submit them all")


def job_safety_checker(given: str | None, default: str | None) -> str | None:
    """The safety checker a job records: `given` (`off`: none), else the settings' `default`.
    A local folder is recorded as its absolute path, which workers load it from; a hub id
    as given. Raises ValueError for a value that is neither."""
    ref = safety_checker_ref(given) if given is not None else default
    if ref is None:
        return None
    path = Path(ref).expanduser()
    if path.exists():
        return str(path.resolve())
    if HUB_REPO_ID.fullmatch(ref):
        return ref
    raise ValueError(f"{ref}: no such safety checker folder, nor a Hugging Face repo id")


def new_job(spec: JobSpec, parsed: PromptFile, *, name: str, defaults: Mapping[str, Any],
            safety_checker: str | None, schedule_id: int | None = None,
            run_day: date | None = None) -> Job:
    """The row of a job submitting `parsed` as `spec` asks, for `sdq submit` and a schedule's
    runs alike: the spec's options with their defaults filled in, its tags once each, the
    safety checker as `job_safety_checker` settled it; `defaults` is what the job records of
    how its items were made (the base seed, the model, the expansion ...)."""
    return Job(name=name, source_name=parsed.source, source_sha256=parsed.sha256,
               defaults=dict(defaults), priority=spec.priority or 0,
               tags=list(dict.fromkeys(spec.tags)), safety_checker=safety_checker,
               on_flag=spec.on_flag or ON_FLAG[0], reuse=spec.reuse, schedule_id=schedule_id,
               run_day=run_day)


@dataclass(frozen=True)
class Submission:
    """What `submit` did: the job, its batches, and where they went."""

    job_id: int
    items: int
    batches: int
    queues: tuple[str, ...]
    """The broker queues the batches went to, one per model; empty when they ran in-process."""
    report: RunReport | None
    """Embedded mode only: what the in-process run did."""

    @property
    def queue(self) -> str | None:
        """The queue of a single-model submission; None in embedded mode or for several."""
        return self.queues[0] if len(self.queues) == 1 else None


def submit(
    settings: Settings, items: Iterable[Mapping[str, Any]], *, model: ModelIdentity | None,
    job: Job | None = None, batch_size: int | None = None,
    batches_per_message: int = BATCHES_PER_MESSAGE,
    on_recorded: Callable[[int], None] | None = None,
    on_submitted: Callable[[int, int, int], None] | None = None,
    on_step: Callable[[int, int, int], None] | None = None,
    make_runner: RunnerFactory | None = None, inits: Sequence[InitSource] = (),
) -> Submission:
    """Record `job` (default: an empty Job) with one item per spec (`Item` fields, see
    `db.queries.submit_job`) in one transaction, then enqueue its batches on their models'
    queues, or, with no broker configured, run them here (`on_recorded(n)` after each stored
    chunk, `on_step(images, i, steps)` as they denoise). `model` is the default: a spec with
    its own `model_id` (a prompt file row naming a registered model) keeps it, and each
    model's batches go to that model's queue; None when every spec names its model.
    `on_submitted(job_id, items, batches)` is called once the job is committed, before any
    batch runs, so a caller can name the job even if the run is interrupted. `make_runner`
    builds the in-process runner; it is needed in embedded mode only. `inits` are the init
    images the specs' `init_sha256` name: stored first, their rows recorded with the items
    (`jobs.inits`).

    Raises ValueError (a bad spec or no items; nothing recorded) or
    `db.session.SchemaMismatch`.
    """
    check_runner(settings, make_runner)
    if settings.broker_url is not None:
        check_broker(settings.broker_url)
    engine = open_database(settings.database_url)
    try:
        storage = None
        if inits:
            from sdq.images.storage import configured_storage

            storage = configured_storage(settings)
            init_images.upload(storage, inits)
        with Session(engine, expire_on_commit=False) as session:
            model_id = _model_id(session, model) if model is not None else None
            job = job or Job()
            if (job.priority or 0) not in PRIORITIES:
                raise ValueError(f"priority must be {PRIORITIES.start}-{PRIORITIES.stop - 1}, got {job.priority}")
            transitions.start_job(job, embedded=settings.embedded)
            if storage is not None:
                init_images.record(session, storage, inits)
            submit_job(session, job, (_with_model(spec, model_id) for spec in items))
            if job.item_count == 0:
                raise ValueError("nothing to submit: no items")
            session.commit()
            planned = plan_batches(session, Item.job_id == job.id,
                                   default_batch_size(batch_size, settings.batch_size),
                                   prefix=f"j{job.id}")
        batches = sum(len(b) for b in planned.values())
        if on_submitted:
            on_submitted(job.id, job.item_count, batches)
        try:
            with handed_back_on_interrupt(engine, job.id):
                report = dispatch(settings, engine, planned, Item.job_id == job.id,
                                  batches_per_message=batches_per_message,
                                  model_refs={model.sha256: model.ref} if model else None,
                                  on_recorded=on_recorded,
                                  on_step=on_step, make_runner=make_runner)
        except Exception as exc:
            if settings.embedded or not _broker_error(exc):
                raise
            raise NotEnqueued(job.id, exc) from exc
        queues = () if settings.embedded else tuple(queue_name(sha256) for sha256 in planned)
        return Submission(job.id, job.item_count, batches, queues, report)
    finally:
        engine.dispose()


class NotEnqueued(Unavailable):
    """The job was recorded but the broker failed before its messages were all sent: the
    message names the job and the command that finishes it, so that submitting again (a second
    job) is never the only way out. Workers' periodic reconcile also picks it up."""

    def __init__(self, job_id: int, cause: Exception) -> None:
        detail = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
        super().__init__(f"job {job_id} was recorded but not enqueued (broker: {detail}); "
                         f"`sdq resume {job_id}` enqueues it once the broker is back "
                         "(do not submit again: that would make a second job)")
        self.job_id = job_id


def _broker_error(exc: Exception) -> bool:
    from kombu.exceptions import KombuError
    from redis.exceptions import RedisError

    return isinstance(exc, (KombuError, RedisError, OSError))
@contextmanager
def handed_back_on_interrupt(engine: Engine, job_id: int) -> Iterator[None]:
    """Ctrl-C of an in-process run: the runner has handed the job's unfinished items back;
    the job goes back to `pending` too, so that `sdq status` does not show it running when
    nothing runs it (`sdq resume` takes it up)."""
    try:
        yield
    except KeyboardInterrupt:
        with Session(engine) as session, session.begin():
            transitions.hand_back_job(session, job_id)
        raise


def _model_id(session: Session, model: ModelIdentity) -> int:
    """The model's row, added on first use (a concurrent submit adding it too is fine)."""
    by_hash = select(Model.id).where(Model.sha256 == model.sha256)
    if (found := session.scalar(by_hash)) is not None:
        return found
    try:
        with session.begin_nested():
            session.add(Model(sha256=model.sha256, name=model.name[:200], source_uri=model.ref,
                              architecture=model.architecture))
    except IntegrityError:
        pass
    return session.scalars(by_hash).one()


_NO_DEFAULT = "an item names no model, and the job has no default model"


def _with_model(spec: Mapping[str, Any], default_id: int | None) -> Mapping[str, Any]:
    """An item spec with its model: its own, else the default (ValueError when there is none)."""
    if "model_id" in spec:
        return spec
    if default_id is None:
        raise ValueError(_NO_DEFAULT)
    return {"model_id": default_id, **spec}


def _default(model: ModelIdentity | None) -> tuple[str, str]:
    """The default model's name and sha256, for items without a model of their own."""
    if model is None:
        raise ValueError(_NO_DEFAULT)
    return model.name, model.sha256


def plan(session: Session, items: Sequence[Mapping[str, Any]], model: ModelIdentity | None,
         batch_size: int) -> list[dict[str, Any]]:
    """What submitting `items` would run, recording nothing: one group per model, batch
    shape and img2img strength (the key `plan_batches` groups by), with its images, batches
    and an estimate from the finished images of the same model, sampler and size (seconds
    per image and step, times the steps each image runs: all of them, or `int(steps *
    strength)` from an init image; None without any). `model` is the default of items
    without a `model_id` (None: every item has one)."""
    known = {m.id: (m.name, m.sha256) for m in all_models(session)}
    default_id = next((i for i, (_, sha256) in known.items()
                       if model is not None and sha256 == model.sha256), None)
    groups = Counter((item.get("model_id", default_id), GenerationParams.of(item).shape,
                      item.get("strength")) for item in items)
    planned = []
    for (model_id, shape, strength), images in groups.items():
        label, sha256 = known.get(model_id) or _default(model)
        per_step = None if model_id is None else seconds_per_step(
            session, model_id=model_id, sampler=shape.sampler, width=shape.width,
            height=shape.height)
        steps = shape.steps if strength is None else steps_run(shape.steps, strength)
        planned.append({"model": label, "model_sha256": sha256, "sampler": shape.sampler,
                        "steps": shape.steps, "size": f"{shape.width}x{shape.height}",
                        "eta": shape.eta, "strength": strength, "images": images,
                        "batches": -(-images // batch_size),
                        "estimated_s": None if per_step is None else per_step * steps * images})
    return planned


def stored_count(session: Session, items: Sequence[Mapping[str, Any]],
                 model: ModelIdentity | None, settings: Settings) -> int:
    """How many of `items` have their image stored already (done items with the cache key
    they would get), for `--dry-run`: an estimate, made for the device and dtypes the settings
    give here (a worker's decide; unset, the device guessed without loading torch) and without
    a safety check (a job with one reuses only images its checker judged), without checking
    that the objects are still there."""
    from sdq.sdmodel.devices import default_dtype, likely_device

    device = settings.device or likely_device()
    dtype = settings.dtype or default_dtype(device)
    known: dict[int | None, str] = {m.id: m.sha256 for m in all_models(session)}
    keys = Counter(cache_key(GenerationParams.of(item), watermark=settings.watermark,
                             model_sha256=known.get(item.get("model_id")) or _default(model)[1],
                             device=device, dtype=dtype, vae_dtype=settings.vae_dtype,
                             loras=item.get("loras"), embeddings=item.get("embeddings"),
                             init=InitImage.of(item))
                   for item in items)
    found: set[str] = set()
    ordered = list(keys)
    for start in range(0, len(ordered), _LOOKUP_CHUNK):
        found.update(session.scalars(select(Item.cache_key).distinct().where(
            Item.cache_key.in_(ordered[start:start + _LOOKUP_CHUNK]),
            Item.status == Status.DONE, Item.image_key.is_not(None))))
    return sum(count for key, count in keys.items() if key in found)


_LOOKUP_CHUNK = 500
"""Keys per `IN (...)` lookup: well under SQLite's bound-parameter limit."""


def plan_batches(session: Session, where: ColumnElement[bool], batch_size: int, *, prefix: str
                 ) -> dict[str, list[Batch]]:
    """The matching items, by model sha256, in batches of one `BatchShape` (sampler, steps,
    size, eta), one img2img strength (it decides where the schedule starts; text-to-image
    items have none) and one job priority, at most `batch_size` items each; highest priority
    first, then in submission order. Guidance, prompts, seeds, init images and LoRAs may
    differ within a batch: each image has its own generator, so batching never changes it.
    Within a group, items of one LoRA set are planned together (sets in order of first use),
    so a job alternating LoRAs has each set's items in as few batches as they fill, and a
    worker merges each set once per batch it appears in, not once per batch for every set."""
    from sdq.core.batch import Batch

    rows = session.execute(
        select(Item.id, Model.sha256, Job.priority, Item.strength, Item.loras,
               *(getattr(Item, f) for f in SHAPE_FIELDS))
        .join(Model, Item.model_id == Model.id).join(Job, Item.job_id == Job.id)
        .where(where).order_by(Job.priority.desc(), Item.job_id, Item.row_index)
    )
    groups: dict[tuple[Any, ...], dict[str, list[int]]] = {}
    for item_id, sha256, priority, strength, loras, *values in rows:
        shape = BatchShape(**dict(zip(SHAPE_FIELDS, values)))
        lora_set = json.dumps(loras or [], sort_keys=True)
        groups.setdefault((sha256, priority, shape, strength), {}).setdefault(
            lora_set, []).append(item_id)
    planned: dict[str, list[Batch]] = {}
    for (sha256, priority, *_), sets in groups.items():
        ids = [item_id for members in sets.values() for item_id in members]
        batches = planned.setdefault(sha256, [])
        for start in range(0, len(ids), batch_size):
            batches.append(Batch(f"{prefix}-{sha256[:6]}-{len(batches)}",
                                 tuple(ids[start:start + batch_size]), priority))
    return planned


def dispatch(
    settings: Settings, engine: Engine, planned: Mapping[str, Sequence[Batch]],
    where: ColumnElement[bool], *, batches_per_message: int = BATCHES_PER_MESSAGE,
    model_refs: Mapping[str, str] | None = None,
    on_recorded: Callable[[int], None] | None = None,
    on_step: Callable[[int, int, int], None] | None = None,
    make_runner: RunnerFactory | None = None,
) -> RunReport | None:
    """Publish the batches to their models' queues at their priority (a message holds batches
    of one priority), then mark the pending items matching `where` (the predicate they were
    planned with) queued, in one statement; in embedded mode run them here instead, on
    runners from `make_runner`, one model after the other, each loaded from
    `model_refs[sha256]`, else from where its model row says it came from, else the settings'
    model."""
    if settings.embedded:
        from sdq.core.batch import RunReport

        check_runner(settings, make_runner)
        assert make_runner is not None
        refs = _model_sources(engine, planned)
        refs.update(model_refs or {})
        report = RunReport()
        for sha256, batches in planned.items():
            runner = make_runner(settings, engine, refs.get(sha256) or settings.model)
            report.add(runner.run(batches, on_recorded, on_step))
        return report
    app = create_app(settings)
    # A connection of our own: the app's pool is kombu's process-wide one, which would keep a
    # connection open after we return.
    with app.connection_for_write() as connection:
        producer = app.amqp.Producer(connection)
        for sha256, batches in planned.items():
            for priority, same in groupby(batches, key=lambda b: b.priority):
                level = list(same)
                for start in range(0, len(level), batches_per_message):
                    message = [b.to_json() for b in level[start:start + batches_per_message]]
                    app.send_task(TASK_NAME, args=[message], queue=queue_name(sha256),
                                  priority=broker_priority(priority), producer=producer)
    with Session(engine) as session, session.begin():
        transitions.mark_queued(session, where)
    return None


def _model_sources(engine: Engine, planned: Mapping[str, Sequence[Batch]]) -> dict[str, str]:
    """sha256 -> the recorded source of each planned model that has one."""
    with Session(engine) as session:
        rows = session.execute(select(Model.sha256, Model.source_uri)
                               .where(Model.sha256.in_(list(planned))))
        return {sha256: source for sha256, source in rows if source}
