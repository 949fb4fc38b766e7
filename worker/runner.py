"""The batch runner: claim items, generate them, store the PNGs and record them as done.

One code path for both modes: a Celery task calls `Runner.run` with the batches its message
carries, and embedded mode calls it in-process. The database is the source of truth, so every
step is guarded by the item's row, which makes redelivered or duplicated messages harmless:

- claiming an item takes a lease (`status = running`, `lease_expires_at`) and bumps its
  `attempts`; items done, failed or cancelled are skipped, and items under another live lease
  are waited for (their holder may be alive) until that lease runs out;
- a renewal thread keeps the leases of the running batch alive, so only a lost worker's items
  expire;
- storing uploads first, under a key derived from the item and the attempt, then records the
  image in a short transaction only if this claim (the same `attempts`) still holds the row;
  a claim lost meanwhile deletes its own object and records nothing (see `Runner._record`).

Before any of that, and before the model is loaded, the result cache: an item whose cache key
(`params.cache_key`) a done item has, with its object still stored, is finished at once as
reusing that object (`reused_from`), with no model call (`Runner._reuse_stored`).

While the model denoises one micro-batch, store threads encode, watermark, upload and record
the previous ones, each chunk cut in parts so that all threads work on it. At most
`QUEUED_CHUNKS` finished chunks wait or are being stored; the generator blocks beyond that, so
memory stays flat when storage is slow. `run` returns (and the task acknowledges) only when all
are recorded.

A job that names a safety checker has each image scored on the store threads too, so on a GPU
the checker overlaps the next chunk's denoising; the checker is loaded once per runner (per
worker process), before the batch that first needs it is denoised, and a job whose checker
cannot be loaded fails its items instead of running them unchecked.
"""
from __future__ import annotations

import contextlib
import logging
import math
import socket
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from itertools import count, groupby
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Sequence

import torch
from PIL import Image
from sqlalchemy import select, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DisconnectionError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from sdq.db.base import utcnow
from sdq.db.models import Item, Job, Model, Status
from sdq.db.session import read_only
from sdq.sdmodel.checkpoint import CheckpointError, ModelNotFound, model_changed, model_sha256, resolve_model_ref
from sdq.core.params import BatchShape, GenerationParams, ParamError, cache_key
from sdq.sdmodel.pipeline import Pipeline, default_device, default_dtype, load_pipeline
from sdq.images.provenance import (
    EncodedPng,
    Environment,
    Provenance,
    SafetyVerdict,
    encode_png,
    environment_fingerprint,
)
from sdq.images.safety import judge, stored_image
from sdq.images.storage import Storage, StorageError, image_key
from sdq.core.settings import DEFAULT_PNG_LEVEL, default_store_threads

if TYPE_CHECKING:
    from sdq.sdmodel.safety import SafetyChecker

log = logging.getLogger(__name__)

LEASE_S = 120
"""How long a claim lasts without renewal: the longest a redelivered batch whose worker died
waits before taking the items over. Capped by the broker's visibility timeout, so a lost
machine's items are free by the time its message comes back."""
REUSE_CHUNK = 500
"""Items looked up in the result cache at once: one read, one lookup and one write each."""
QUEUED_CHUNKS = 2
"""Finished chunks held for storing at most: one being stored and one ready, so the store
threads never wait on the GPU while storage keeps up, and memory stays flat when it does not."""
BACKOFF_S = 0.5
BACKOFF_CAP_S = 30.0
"""Longest wait between two tries during an outage: a service back after a long cut is used
within this long."""
OUTAGE_S = 1800.0
"""How long storage or the database may stay down before a runner hands its items back
(`SDQ_OUTAGE_TIMEOUT`): long enough for a restart or a failover, never a reason to fail them."""
TRANSIENT = (StorageError, OperationalError, DisconnectionError)
"""Infrastructure failures, waited out: storage and database down or refusing. They never count
as an attempt of an item. Anything else is the item's (or the model's) own failure."""
FINISHED = (Status.DONE, Status.FAILED, Status.CANCELLED)


class TransientError(RuntimeError):
    """Storage or database stayed down for the whole outage window; the unfinished items
    were handed back (queued, the attempt not counted) so that a later delivery takes them."""


@dataclass(frozen=True)
class Batch:
    """Items meant to be denoised together; `id` is recorded with each item that runs in it."""

    id: str
    item_ids: tuple[int, ...]
    priority: int = 0
    """Its job's; it decides where the message waits, so the message does not carry it."""

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "items": list(self.item_ids)}

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> "Batch":
        return cls(str(record["id"]), tuple(int(i) for i in record["items"]))


@dataclass(frozen=True)
class Work:
    """A claimed item as plain data, so threads never share ORM objects."""

    id: int
    job_id: int
    row_index: int
    params: GenerationParams
    attempt: int
    safety_checker: str | None = None
    """The job's checker (a folder or hub id), None for no check."""
    on_flag: str = "keep"

    @property
    def shape(self) -> BatchShape:
        """What items must share to be denoised in one batch."""
        return self.params.shape


@dataclass(frozen=True)
class Chunk:
    """Items actually denoised together, with the id and positions they are recorded under."""

    batch_id: str
    items: tuple[Work, ...]
    images: tuple[Image.Image, ...]
    seconds: float
    first: int = 0
    """Batch position of the first item: a part of a chunk keeps its items' positions."""

    def parts(self, count: int) -> list["Chunk"]:
        """The chunk cut into at most `count` runs of consecutive items, to be stored in
        parallel; each part carries its share of the denoising time."""
        size = math.ceil(len(self.items) / count)
        return [Chunk(self.batch_id, self.items[i:i + size], self.images[i:i + size],
                      self.seconds * len(self.items[i:i + size]) / len(self.items), self.first + i)
                for i in range(0, len(self.items), size)]


@dataclass(frozen=True)
class _Identity:
    """The model as the cache key sees it."""

    sha256: str
    device: str
    dtype: str


@dataclass(frozen=True)
class _Source:
    """A stored image an item may reuse: the item that made it, and what its row records."""

    item_id: int
    image_key: str
    image_sha256: str | None
    watermark: str | None


@dataclass
class RunReport:
    done: int = 0
    """Items finished as done, reused ones included."""
    failed: int = 0
    skipped: int = 0
    reused: int = 0
    """Done items whose image existed already: no model call."""

    def add(self, other: "RunReport") -> None:
        self.done, self.failed = self.done + other.done, self.failed + other.failed
        self.skipped, self.reused = self.skipped + other.skipped, self.reused + other.reused


class Runner:
    """Runs batches on one model, loaded on first use and kept for the life of the process."""

    def __init__(
        self, *, engine: Engine, storage: Storage, model_ref: str, device: str | None = None,
        dtype: str | None = None, watermark: str | None = None, hash_cache: Any = None,
        max_attempts: int = 3, lease_s: float = LEASE_S, micro_batch: int | None = None,
        worker_name: str | None = None, pipeline: Pipeline | None = None,
        png_level: int = DEFAULT_PNG_LEVEL, store_threads: int | None = None, fast: str | None = None,
        outage_s: float = OUTAGE_S,
    ) -> None:
        """`pipeline`: one already loaded (benchmarks, tests); otherwise `model_ref` is loaded
        on the first run, with the fast path `fast` (a `FastPath.parse` string).
        `store_threads`: None for one per core, up to 8."""
        # Every runner transaction reads rows, then writes them: on SQLite it takes the write
        # lock up front (engine_from_url's default, the role FOR UPDATE plays on PostgreSQL),
        # so store threads recording at once queue on the busy timeout; the cache lookups
        # only read.
        self.sessions = sessionmaker(engine, expire_on_commit=False)
        self.reads = sessionmaker(read_only(engine))
        self.storage = storage
        self.model_ref, self.device, self.dtype = model_ref, device, dtype
        self.watermark, self.hash_cache = watermark, hash_cache
        self.max_attempts, self.lease_s, self.micro_batch = max_attempts, lease_s, micro_batch
        self.outage_s = outage_s
        self.worker_name = worker_name or socket.gethostname()
        self.png_level = png_level
        self.store_threads = store_threads or default_store_threads()
        self.current_batch: str | None = None
        self.images_done = 0
        """Images this runner generated and recorded (reused ones not counted)."""
        self.images_reused = 0
        self._done_lock = threading.Lock()  # store threads add to `images_done` at once
        self._pipeline = pipeline
        self.fast = fast
        self._checkers: dict[str, SafetyChecker] = {}
        """Safety checkers by the reference jobs name them with, loaded once, on first use."""

    def pipeline(self) -> Pipeline:
        if self._pipeline is None:
            self._pipeline = load_pipeline(self.model_ref, device=self.device, dtype=self.dtype,
                                           hash_cache=self.hash_cache, fast=self.fast)
        return self._pipeline

    def safety_checker(self, ref: str) -> SafetyChecker:
        """The checker `ref` names, on the model's device and in its dtype, loaded once."""
        if ref not in self._checkers:
            from sdq.sdmodel.pipeline import DTYPES
            from sdq.sdmodel.safety import load_safety_checker

            pipe = self.pipeline()
            self._checkers[ref] = load_safety_checker(ref, device=pipe.device, dtype=DTYPES[pipe.dtype],
                                                      hash_cache=self.hash_cache)
        return self._checkers[ref]

    def _with_checkers(self, work: list[Work], report: RunReport) -> list[Work]:
        """The claimed items whose safety checker loads; the others fail with the reason (a
        job that asked for a check never runs without one)."""
        failed: dict[str, str] = {}
        for ref in {w.safety_checker for w in work if w.safety_checker}:
            try:
                self.safety_checker(ref)
            except Exception as exc:  # noqa: BLE001 - any load failure, as for the model
                failed[ref] = f"safety checker: {exc}"
        for ref, reason in failed.items():
            ids = [w.id for w in work if w.safety_checker == ref]
            report.failed += self._retrying("failing items", lambda: self._fail(ids, reason))
        return [w for w in work if w.safety_checker not in failed]

    def run(self, batches: Sequence[Batch], on_recorded: Callable[[int], None] | None = None,
            on_step: Callable[[int, int, int], None] | None = None) -> RunReport:
        """Run every batch. `on_recorded(n)` after n images are stored; `on_step(images, i,
        steps)` as the images denoised together reach step i, for progress between chunks.
        Every item ends done, failed with its reason, or handed back:

        - a model that cannot be loaded, for any reason, fails the items (one attempt each);
        - an error while generating fails the items it concerns (`_generate`), the rest go on;
        - storage or the database down longer than the outage window raises TransientError,
          and whatever is left (including what a crash leaves) is handed back in `finally`:
          infrastructure failures and interruptions without counting the attempt, anything
          else with its reason in `last_error`.
        """
        report = RunReport()
        # The result cache first, without loading the model: a message whose images are
        # all stored already costs no model load.
        identity = self._identity()
        reused = set() if identity is None else self._retrying(
            "reusing stored images", lambda: self._reuse_stored(batches, identity))
        report.done, report.reused = len(reused), len(reused)
        self.images_reused += len(reused)
        if on_recorded and reused:
            on_recorded(len(reused))
        ids = [i for batch in batches for i in batch.item_ids if i not in reused]
        if not ids:
            return report
        try:
            pipe = self.pipeline()
        except Exception as exc:  # noqa: BLE001 - any load failure is the model's, recorded
            reason = f"model: {exc}"
            report.failed += self._retrying(
                "failing items", lambda: self._fail(ids, reason, attempts=Item.attempts + 1))
            return report
        environment = environment_fingerprint(pipe.device, pipe.dtype)
        claimed: list[int] = []
        error: BaseException | None = None
        try:
            # The queue drains (every chunk stored) before the leases stop being renewed.
            with _LeaseKeeper(self) as leases, \
                    _StoreQueue(self.store_threads, QUEUED_CHUNKS) as queue:
                for batch in batches:
                    left = [i for i in batch.item_ids if i not in reused]
                    if not left:
                        continue
                    self.current_batch = batch.id
                    work = self._retrying("claiming items", lambda: self._claim(batch, pipe))
                    report.skipped += len(left) - len(work)
                    claimed.extend(w.id for w in work)
                    leases.hold(w.id for w in work)
                    work = self._with_checkers(work, report)
                    for chunk in self._generate(pipe, batch.id, work, report, on_step):
                        queue.put([partial(self._store, part, environment, on_recorded)
                                   for part in chunk.parts(self.store_threads)])
                self.current_batch = None
            errors = []
            for future in queue.futures:
                try:
                    report.done += future.result()
                except TransientError as exc:
                    errors.append(exc)
            if errors:
                raise errors[0]
        except BaseException as exc:
            error = exc
            raise
        finally:
            self.current_batch = None
            self._hand_back(claimed, error)
        return report

    def _hand_back(self, ids: Sequence[int], error: BaseException | None) -> None:
        """Queue again the claimed items this run leaves unfinished. Interruptions (Ctrl-C,
        shutdown) and outages are not the item's fault: the attempt is given back. Anything
        else counts, with its reason, so a crash that repeats ends in "gave up after N
        attempts" instead of a loop. If the database is down too, the leases run out and the
        workers' reconcile takes the items."""
        if not ids or error is None:  # a run that returns has finished or failed every item
            return
        values: dict[str, Any] = {}
        if isinstance(error, (TransientError, KeyboardInterrupt, SystemExit)):
            values["attempts"] = Item.attempts - 1
        else:
            values["last_error"] = f"{type(error).__name__}: {error}"[:2000]
        try:
            self._release(ids, worker_host=self.worker_name, **values)
        except TRANSIENT as exc:
            log.warning("could not hand %d item(s) back, their leases will run out: %s",
                        len(ids), exc)

    # -- claiming -----------------------------------------------------------------------

    def _claim(self, batch: Batch, pipe: Pipeline) -> list[Work]:
        """Take the batch's free items; wait while another live lease holds some of them."""
        deadline = time.monotonic() + self.lease_s + 1
        while True:
            with self.sessions.begin() as session:
                rows = session.execute(
                    select(Item, Model.sha256, Job.safety_checker, Job.on_flag)
                    .join(Model, Item.model_id == Model.id).join(Job, Item.job_id == Job.id)
                    .where(Item.id.in_(batch.item_ids)).order_by(Item.id).with_for_update(of=Item)
                ).all()
                now = utcnow()
                busy = {item.id for item, *_ in rows if _leased(item.status, item.lease_expires_at, now)}
                if not busy or time.monotonic() > deadline:
                    return self._take(session, batch, rows, busy, pipe)
            time.sleep(min(1.0, self.lease_s / 4))

    def _take(self, session: Session, batch: Batch, rows: Sequence[Any], busy: set[int],
              pipe: Pipeline) -> list[Work]:
        now = utcnow()
        order = {item_id: n for n, item_id in enumerate(batch.item_ids)}
        work = []
        closing = set()
        for item, sha256, checker, on_flag in sorted(rows, key=lambda row: order[row[0].id]):
            if item.status in FINISHED or item.id in busy:
                continue
            if sha256 != pipe.sha256:  # its queue's model: the file changed since
                item.status, item.lease_expires_at, item.finished_at = Status.FAILED, None, now
                item.last_error = model_changed(self.model_ref, sha256, pipe.sha256)
                closing.add(item.job_id)
                continue
            if item.attempts >= self.max_attempts:
                item.status, item.lease_expires_at, item.finished_at = Status.FAILED, None, now
                item.last_error = (f"gave up after {item.attempts} attempts; last error: "
                                   f"{item.last_error or 'worker lost during the batch'}")
                closing.add(item.job_id)
                continue
            try:
                params = item.params
            except ParamError as exc:  # recorded by something that skipped the checks
                item.status, item.finished_at, item.last_error = Status.FAILED, now, str(exc)
                item.lease_expires_at = None
                closing.add(item.job_id)
                continue
            item.status, item.attempts = Status.RUNNING, item.attempts + 1
            item.lease_expires_at = now + timedelta(seconds=self.lease_s)
            item.worker_host, item.started_at, item.batch_id = self.worker_name, now, batch.id
            item.cache_key = self._key(params, pipe)
            work.append(Work(item.id, item.job_id, item.row_index, params, item.attempts,
                             checker, on_flag))
        session.flush()
        _finish_jobs(session, closing)
        return work

    # -- the result cache ---------------------------------------------------------------

    def _identity(self) -> _Identity | None:
        """What the cache key needs of the model, without loading it: its sha256 (hashes
        are cached), and the device and dtype it is (or will be) loaded on, as
        `load_pipeline` chooses them. None when the model cannot be found (loading it then
        fails the items with the reason)."""
        if self._pipeline is not None:
            return _Identity(self._pipeline.sha256, self._pipeline.device, self._pipeline.dtype)
        try:
            sha256 = model_sha256(resolve_model_ref(self.model_ref), self.hash_cache)
        except (CheckpointError, ModelNotFound, ValueError, OSError):
            return None
        device = self.device or default_device()
        return _Identity(sha256, device, self.dtype or default_dtype(device))

    def _key(self, params: GenerationParams, model: Pipeline | _Identity) -> str:
        return cache_key(params, model_sha256=model.sha256, watermark=self.watermark,
                         device=model.device, dtype=model.dtype)

    def _reuse_stored(self, batches: Sequence[Batch], pipe: _Identity) -> set[int]:
        """Finish, as reusing the stored image, every item of the batches whose image is
        stored already (a done item with its cache key, whose object is still there); their
        ids. Done before anything is generated, a chunk of items at a time, so that a job
        that is all cached costs a few queries per thousand items and no model call."""
        ids = [item_id for batch in batches for item_id in batch.item_ids]
        reused: set[int] = set()
        for start in range(0, len(ids), REUSE_CHUNK):
            reused |= self._reuse_chunk(ids[start:start + REUSE_CHUNK], pipe)
        return reused

    def _reuse_chunk(self, ids: Sequence[int], pipe: _Identity) -> set[int]:
        with self.reads() as session:
            items = session.execute(
                select(Item).join(Job, Item.job_id == Job.id).join(Model, Item.model_id == Model.id)
                .where(Item.id.in_(ids), Item.status.not_in(FINISHED), Job.reuse,
                       Model.sha256 == pipe.sha256)).scalars().all()
            keys: dict[int, str] = {}
            for item in items:
                with contextlib.suppress(ParamError):  # failed when a worker takes it
                    keys[item.id] = self._key(item.params, pipe)
            if not keys:
                return set()
            found = session.execute(
                select(Item.cache_key, Item.id, Item.reused_from, Item.image_key,
                       Item.image_sha256, Item.watermark)
                .where(Item.cache_key.in_(set(keys.values())), Item.status == Status.DONE,
                       Item.image_key.is_not(None)).order_by(Item.id)).all()
        # Objects are checked outside any transaction: a HEAD request can take a while.
        sources: dict[str, _Source] = {}
        present: dict[str, bool] = {}
        for key, item_id, reused_from, stored, sha256, watermark in found:
            if key not in sources:
                if stored not in present:
                    present[stored] = self.storage.exists(stored)
                if present[stored]:
                    sources[key] = _Source(reused_from or item_id, stored, sha256, watermark)
        hits = {item_id: key for item_id, key in keys.items() if key in sources}
        if not hits:
            return set()
        with self.sessions.begin() as session:
            now = utcnow()
            rows = session.execute(select(Item.id, Item.job_id, Item.status, Item.lease_expires_at)
                                   .where(Item.id.in_(list(hits))).with_for_update()).all()
            free = [(item_id, job_id) for item_id, job_id, status, lease in rows
                    if status not in FINISHED and not _leased(status, lease, now)]
            if free:
                session.execute(update(Item), [{
                    "id": item_id, "status": Status.DONE, "cache_key": hits[item_id],
                    "reused_from": sources[hits[item_id]].item_id,
                    "image_key": sources[hits[item_id]].image_key,
                    "image_sha256": sources[hits[item_id]].image_sha256,
                    "watermark": sources[hits[item_id]].watermark, "device": pipe.device,
                    "worker_host": self.worker_name, "started_at": now, "finished_at": now,
                    "duration_s": 0.0, "lease_expires_at": None, "last_error": None,
                } for item_id, _ in free])
            _finish_jobs(session, {job_id for _, job_id in free})
        return {item_id for item_id, _ in free}

    # -- generating ---------------------------------------------------------------------

    def _generate(self, pipe: Pipeline, batch_id: str, work: list[Work], report: RunReport,
                  on_step: Callable[[int, int, int], None] | None = None) -> Iterator[Chunk]:
        """Denoise the claimed items in chunks of one shape and at most `micro_batch` items
        (unset: what the device holds at that size, `Pipeline.default_batch_size`).

        On CUDA out-of-memory the chunk is halved, and so is `micro_batch` for what follows:
        a worker that ran out once would only run out again at the old size.
        """
        groups = [list(g) for _, g in groupby(sorted(work, key=lambda w: w.shape), key=lambda w: w.shape)]
        sizes = [self.micro_batch or pipe.default_batch_size(g[0].shape.width, g[0].shape.height)
                 for g in groups]
        queue = [g[i:i + size] for g, size in zip(groups, sizes) for i in range(0, len(g), size)]
        whole = len(queue) == 1
        while queue:
            items = queue.pop(0)
            requests = [w.params.request for w in items]
            start = time.perf_counter()
            try:
                steps = None if on_step is None else partial(on_step, len(items))
                images = pipe.generate(requests, **items[0].shape.settings(), on_step=steps)
            except Exception as exc:  # noqa: BLE001 - isolated to the items it concerns below
                oom = _out_of_memory(exc)
                if len(items) == 1:
                    ids, reason = [items[0].id], _generation_error(exc, oom, items[0].shape)
                    report.failed += self._retrying("failing items", lambda: self._fail(ids, reason))
                    continue
                # Split to find the items at fault; out of memory also lowers the size for
                # what follows, as a worker that ran out once would run out again.
                half = len(items) // 2
                if oom:
                    torch.cuda.empty_cache()
                    self.micro_batch = half
                    log.warning("out of memory at batch size %d; continuing at %d", len(items), half)
                else:
                    log.warning("generating %d items failed (%s); trying them apart", len(items), exc)
                queue[:0] = [items[:half], items[half:]] if not oom else \
                    [items[i:i + half] for i in range(0, len(items), half)]
                whole = False
                continue
            chunk_id = batch_id if whole else f"{batch_id}.{items[0].row_index}"
            yield Chunk(chunk_id, tuple(items), tuple(images), time.perf_counter() - start)

    # -- storing ------------------------------------------------------------------------

    def _store(self, chunk: Chunk, environment: Environment,
               on_recorded: Callable[[int], None] | None) -> int:
        """Encode, watermark, upload and record one chunk (or part of one); returns how many
        were recorded."""
        pipe = self.pipeline()
        verdicts = self._check(chunk)
        stored = [stored_image(image, verdict) for image, verdict in zip(chunk.images, verdicts)]
        pngs = [
            None if image is None else encode_png(image, Provenance(
                params=w.params, model_sha256=pipe.sha256, model_name=pipe.name,
                environment=environment, job_id=w.job_id, item_id=w.id, row=w.row_index,
                batch_id=chunk.batch_id, batch_position=chunk.first + position, safety=verdict,
            ), watermark=self.watermark if image is generated else None, level=self.png_level)
            # A black image is not what the model made: it carries no watermark.
            for position, (w, image, generated, verdict)
            in enumerate(zip(chunk.items, stored, chunk.images, verdicts))
        ]
        try:
            recorded = self._retrying("storing images", lambda: self._record(chunk, pngs, verdicts))
        except TransientError as exc:
            ids, reason = [w.id for w in chunk.items], str(exc)
            self._retrying("handing items back", lambda: self._release(
                ids, last_error=reason[:2000], attempts=Item.attempts - 1))
            raise
        with self._done_lock:
            self.images_done += recorded
        if on_recorded:
            on_recorded(recorded)
        return recorded

    def _check(self, chunk: Chunk) -> list[SafetyVerdict | None]:
        """Each image's verdict from its job's checker (None where the job has none), and
        the action its job's `on_flag` takes: runs on a store thread, off the denoising
        path, one call per checker for the chunk's images."""
        verdicts: list[SafetyVerdict | None] = [None] * len(chunk.items)
        for ref in {w.safety_checker for w in chunk.items if w.safety_checker}:
            positions = [n for n, w in enumerate(chunk.items) if w.safety_checker == ref]
            judged = judge(self.safety_checker(ref), [chunk.images[n] for n in positions],
                           [chunk.items[n].on_flag for n in positions])
            for n, verdict in zip(positions, judged):
                verdicts[n] = verdict
        return verdicts

    def _record(self, chunk: Chunk, pngs: Sequence[EncodedPng | None],
                verdicts: Sequence[SafetyVerdict | None]) -> int:
        """Upload, then mark done, in one short transaction, the items this claim still holds.

        Nothing is uploaded under a row lock: uploads take as long as the network does, and
        a lock held meanwhile would keep every other writer of these rows (claims, `sdq
        cancel`, reconcile) waiting.
        The claim can therefore be lost during the upload (lease run out, item cancelled or
        taken over). That is safe because each attempt uploads to its own key (`image_key`):
        a retry of this call overwrites its own object, a lost claim's object never replaces
        the one the new holder records, and the check under lock decides which object the
        row points to. A lost claim deletes its object; a later attempt that records also
        deletes the objects of earlier ones, in case their worker died before cleaning up.
        """
        keys = [None if png is None else image_key(w.job_id, w.id, w.attempt)
                for w, png in zip(chunk.items, pngs)]
        for key, png in zip(keys, pngs):
            if key is not None and png is not None:
                self.storage.put(key, png.data)
        share = chunk.seconds / len(chunk.items)
        with self.sessions.begin() as session:
            found = {row.id: row for row in session.execute(
                select(Item.id, Item.status, Item.attempts, Item.image_key)
                .where(Item.id.in_([w.id for w in chunk.items])).order_by(Item.id)
                .with_for_update())}
            ours = {w.id for w in chunk.items if w.id in found
                    and (found[w.id].status, found[w.id].attempts) == (Status.RUNNING, w.attempt)}
            rows = [{"id": w.id, "status": Status.DONE, "image_key": key,
                     "image_sha256": png.sha256 if png else None,
                     "watermark": png.watermark if png else None,
                     "batch_id": chunk.batch_id, "batch_position": chunk.first + position,
                     "device": self.pipeline().device, "lease_expires_at": None,
                     "last_error": None, "finished_at": utcnow(), "duration_s": share,
                     **_safety_columns(verdict)}
                    for position, (w, key, png, verdict)
                    in enumerate(zip(chunk.items, keys, pngs, verdicts)) if w.id in ours]
            if rows:
                session.execute(update(Item), rows)
            _finish_jobs(session, {w.job_id for w in chunk.items})
        for w, key in zip(chunk.items, keys):
            if w.id in ours:
                self._delete([image_key(w.job_id, w.id, n) for n in range(1, w.attempt)])
            elif key is not None and (w.id not in found or found[w.id].image_key != key):
                self._delete([key])  # not our earlier commit
        return len(rows)

    def _delete(self, keys: Sequence[str]) -> None:
        """Remove objects no row points to; one left behind is only wasted space."""
        for key in keys:
            try:
                self.storage.delete(key)
            except StorageError as exc:
                log.warning("could not delete unrecorded image %s: %s", key, exc)

    # -- state changes for failures -----------------------------------------------------

    def _fail(self, ids: Sequence[int], reason: str, **values: Any) -> int:
        """Permanent failure: the items will not succeed by retrying (bad model, bad input,
        too big for this worker's memory); `values` are further columns to set."""
        log.error("failing %d item(s): %s", len(ids), reason)
        with self.sessions.begin() as session:
            stmt = (update(Item).where(Item.id.in_(ids), Item.status.not_in(FINISHED))
                    .values(status=Status.FAILED, last_error=reason[:2000], lease_expires_at=None,
                            finished_at=utcnow(), **values))
            count = session.execute(stmt).rowcount
            jobs = set(session.scalars(select(Item.job_id).where(Item.id.in_(ids)).distinct()))
            _finish_jobs(session, jobs)
        return count

    def _release(self, ids: Sequence[int], worker_host: str | None = None, **values: Any) -> None:
        """Hand the items still running back to the queue, their lease dropped and `values` set
        (only those `worker_host` holds, when given)."""
        held = Item.worker_host == worker_host if worker_host else Item.id.is_not(None)
        with self.sessions.begin() as session:
            session.execute(update(Item).where(Item.id.in_(ids), Item.status == Status.RUNNING, held)
                            .values(status=Status.QUEUED, lease_expires_at=None, **values))

    def _retrying(self, what: str, action: Callable[[], Any]) -> Any:
        """`action`, retried on infrastructure failures with exponential backoff capped at
        BACKOFF_CAP_S, for as long as the outage window (`outage_s`) lasts; then TransientError.
        The window, not a number of tries, bounds it: a database restart or an S3 outage of
        minutes is waited out, and no item is failed or charged an attempt for it."""
        deadline = time.monotonic() + self.outage_s
        for attempt in count(1):
            try:
                return action()
            except TRANSIENT as exc:
                wait = min(BACKOFF_CAP_S, BACKOFF_S * 2 ** (attempt - 1))
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TransientError(f"{what} failed {attempt} times over "
                                         f"{self.outage_s:.0f}s: {exc}") from exc
                log.warning("%s failed (try %d, %.0fs of the outage window left), retrying: %s",
                            what, attempt, left, exc)
                time.sleep(min(wait, left))
        raise AssertionError("unreachable")


def _safety_columns(verdict: SafetyVerdict | None) -> dict[str, Any]:
    """An item's safety columns: all null when no check ran."""
    if verdict is None:
        return {"safety_flagged": None, "safety_scores": None, "safety_checker_sha256": None,
                "safety_action": None}
    return {"safety_flagged": verdict.flagged, "safety_scores": verdict.scores,
            "safety_checker_sha256": verdict.checker_sha256, "safety_action": verdict.action}


def _out_of_memory(exc: BaseException) -> bool:
    """CUDA's own error, or the CPU allocator's RuntimeError (which has no class of its own)."""
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and ("can't allocate memory" in str(exc)
                                           or "out of memory" in str(exc).lower()))


def _generation_error(exc: BaseException, oom: bool, shape: BatchShape) -> str:
    """The reason recorded for an item that failed alone: what happened, in the user's terms."""
    if oom:
        return f"out of memory generating one {shape.width}x{shape.height} image: {exc}"
    return f"generation: {type(exc).__name__}: {exc}" if not isinstance(exc, ValueError) else str(exc)


def _leased(status: Status, lease_expires_at: Any, now: Any) -> bool:
    """Running under a lease that has not run out: its holder may be alive."""
    return status == Status.RUNNING and lease_expires_at is not None and lease_expires_at > now


def _finish_jobs(session: Session, job_ids: Iterable[int]) -> None:
    """Close the jobs none of whose items is still to run: done, or failed if any item failed.

    The job row is locked first. Transactions that finish a job's last items at the same time
    (the parts of one chunk, on parallel store threads) then take turns here, and the last one
    sees the others' items done; unlocked, each could see the other's still running, and the
    job would never close. Sorted, so two transactions never lock jobs in opposite orders."""
    now = utcnow()
    for job_id in sorted(job_ids):
        session.execute(select(Job.id).where(Job.id == job_id).with_for_update())
        open_items = select(Item.id).where(
            Item.job_id == job_id, Item.status.in_((Status.PENDING, Status.QUEUED, Status.RUNNING)))
        if session.scalar(open_items.limit(1)) is not None:
            continue
        failed = session.scalar(select(Item.id).where(
            Item.job_id == job_id, Item.status == Status.FAILED).limit(1))
        session.execute(update(Job).where(Job.id == job_id, Job.status.not_in(FINISHED))
                        .values(status=Status.FAILED if failed else Status.DONE, finished_at=now))


class _StoreQueue:
    """Store threads fed with finished chunks, at most `bound` chunks at a time: `put` blocks
    the generator while that many are waiting or being stored, so a slow store holds back the
    GPU instead of piling decoded images up in memory."""

    def __init__(self, threads: int, bound: int) -> None:
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="sdq-store")
        self.slots = threading.Semaphore(bound)
        self.futures: list[Future[int]] = []

    def put(self, parts: Sequence[Callable[[], int]]) -> None:
        """Store one chunk as `parts` run on the threads; its slot frees when the last ends."""
        self.slots.acquire()
        left = len(parts)
        lock = threading.Lock()

        def part_done(_: Future[int]) -> None:
            nonlocal left
            with lock:
                left -= 1
                if left == 0:
                    self.slots.release()

        for part in parts:
            future = self.pool.submit(part)
            future.add_done_callback(part_done)
            self.futures.append(future)

    def __enter__(self) -> "_StoreQueue":
        return self

    def __exit__(self, *exc: object) -> None:
        self.pool.shutdown(wait=True)


class _LeaseKeeper(threading.Thread):
    """Renews the leases of the items a runner holds, every third of the lease."""

    def __init__(self, runner: Runner) -> None:
        super().__init__(name="sdq-lease", daemon=True)
        self.runner = runner
        self.ids: set[int] = set()
        self.stopped = threading.Event()

    def hold(self, ids: Iterable[int]) -> None:
        self.ids.update(ids)

    def __enter__(self) -> "_LeaseKeeper":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopped.set()
        self.join(timeout=30)

    def run(self) -> None:
        while not self.stopped.wait(self.runner.lease_s / 3):
            ids = list(self.ids)
            if not ids:
                continue
            try:
                with self.runner.sessions.begin() as session:
                    session.execute(
                        update(Item).where(Item.id.in_(ids), Item.status == Status.RUNNING,
                                           Item.worker_host == self.runner.worker_name)
                        .values(lease_expires_at=utcnow() + timedelta(seconds=self.runner.lease_s)))
            except OperationalError as exc:  # the next renewal may get through; the lease has slack
                log.warning("lease renewal failed: %s", exc)
