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

While the model denoises one micro-batch, store threads encode, watermark, upload and record
the previous ones, each chunk cut in parts so that all threads work on it. At most
`QUEUED_CHUNKS` finished chunks wait or are being stored; the generator blocks beyond that, so
memory stays flat when storage is slow. `run` returns (and the task acknowledges) only when all
are recorded.
"""
from __future__ import annotations

import logging
import math
import socket
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from itertools import groupby
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from PIL import Image
from sqlalchemy import select, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from sdq.db.base import utcnow
from sdq.db.models import Item, Job, Model, Status
from sdq.sdmodel.checkpoint import CheckpointError, ModelNotFound
from sdq.sdmodel.params import BatchShape, GenerationParams, ParamError, short_hash
from sdq.sdmodel.pipeline import Pipeline, load_pipeline
from sdq.worker.images.provenance import (
    EncodedPng,
    Environment,
    Provenance,
    encode_png,
    environment_fingerprint,
)
from sdq.worker.images.storage import Storage, StorageError, image_key
from sdq.worker.settings import DEFAULT_PNG_LEVEL, default_store_threads

log = logging.getLogger(__name__)

LEASE_S = 120
"""How long a claim lasts without renewal: the longest a redelivered batch whose worker died
waits before taking the items over. Capped by the broker's visibility timeout, so a lost
machine's items are free by the time its message comes back."""
QUEUED_CHUNKS = 2
"""Finished chunks held for storing at most: one being stored and one ready, so the store
threads never wait on the GPU while storage keeps up, and memory stays flat when it does not."""
BACKOFF_S = 0.5
TRANSIENT = (StorageError, OperationalError)
"""Failures worth retrying: storage and database hiccups. Anything else is permanent."""
FINISHED = (Status.DONE, Status.FAILED, Status.CANCELLED)


class TransientError(RuntimeError):
    """Storage or database kept failing after the in-process retries; the unfinished items
    were handed back (queued) so that a later delivery can take them."""


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


@dataclass
class RunReport:
    done: int = 0
    failed: int = 0
    skipped: int = 0


class Runner:
    """Runs batches on one model, loaded on first use and kept for the life of the process."""

    def __init__(
        self, *, engine: Engine, storage: Storage, model_ref: str, device: str | None = None,
        dtype: str | None = None, watermark: str | None = None, hash_cache: Any = None,
        max_attempts: int = 3, lease_s: float = LEASE_S, micro_batch: int | None = None,
        worker_name: str | None = None, pipeline: Pipeline | None = None,
        png_level: int = DEFAULT_PNG_LEVEL, store_threads: int | None = None, fast: str | None = None,
    ) -> None:
        """`pipeline`: one already loaded (benchmarks, tests); otherwise `model_ref` is loaded
        on the first run, with the fast path `fast` (a `FastPath.parse` string).
        `store_threads`: None for one per core, up to 8."""
        # Every runner transaction reads rows, then writes them: on SQLite it takes the write
        # lock up front (the role FOR UPDATE plays on PostgreSQL), so store threads recording
        # at once queue on the busy timeout instead of failing on a stale snapshot.
        self.sessions = sessionmaker(engine.execution_options(sqlite_immediate=True),
                                     expire_on_commit=False)
        self.storage = storage
        self.model_ref, self.device, self.dtype = model_ref, device, dtype
        self.watermark, self.hash_cache = watermark, hash_cache
        self.max_attempts, self.lease_s, self.micro_batch = max_attempts, lease_s, micro_batch
        self.worker_name = worker_name or socket.gethostname()
        self.png_level = png_level
        self.store_threads = store_threads or default_store_threads()
        self.current_batch: str | None = None
        self.images_done = 0
        self._done_lock = threading.Lock()  # store threads add to `images_done` at once
        self._pipeline = pipeline
        self.fast = fast

    def pipeline(self) -> Pipeline:
        if self._pipeline is None:
            self._pipeline = load_pipeline(self.model_ref, device=self.device, dtype=self.dtype,
                                           hash_cache=self.hash_cache, fast=self.fast)
        return self._pipeline

    def run(self, batches: Sequence[Batch], on_recorded: Callable[[int], None] | None = None,
            on_step: Callable[[int, int, int], None] | None = None) -> RunReport:
        """Run every batch; raises TransientError (after handing items back) if storage or the
        database stays down. A model that cannot be loaded fails the items, with the reason.
        `on_recorded(n)` after n images are stored; `on_step(images, i, steps)` as the images
        denoised together reach step i, for progress between chunks."""
        report = RunReport()
        try:
            pipe = self.pipeline()
        except (CheckpointError, ModelNotFound, ValueError, OSError) as exc:
            ids, reason = [i for batch in batches for i in batch.item_ids], f"model: {exc}"
            report.failed += self._retrying("failing items", lambda: self._fail(ids, reason))
            return report
        environment = environment_fingerprint(pipe.device, pipe.dtype)
        claimed: list[int] = []
        try:
            # The queue drains (every chunk stored) before the leases stop being renewed.
            with _LeaseKeeper(self) as leases, \
                    _StoreQueue(self.store_threads, QUEUED_CHUNKS) as queue:
                for batch in batches:
                    self.current_batch = batch.id
                    work = self._retrying("claiming items", lambda: self._claim(batch, pipe.sha256))
                    report.skipped += len(batch.item_ids) - len(work)
                    claimed.extend(w.id for w in work)
                    leases.hold(w.id for w in work)
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
        except KeyboardInterrupt:
            # Images already made were stored while the pool drained; the rest go back at once,
            # with their attempt, so that `sdq resume` need not wait for the leases to run out.
            self._release(claimed, attempts=Item.attempts - 1)
            raise
        if errors:
            raise errors[0]
        return report

    # -- claiming -----------------------------------------------------------------------

    def _claim(self, batch: Batch, model_sha256: str) -> list[Work]:
        """Take the batch's free items; wait while another live lease holds some of them."""
        deadline = time.monotonic() + self.lease_s + 1
        while True:
            with self.sessions.begin() as session:
                rows = session.execute(
                    select(Item, Model.sha256).join(Model, Item.model_id == Model.id)
                    .where(Item.id.in_(batch.item_ids)).order_by(Item.id).with_for_update(of=Item)
                ).all()
                now = utcnow()
                busy = {item.id for item, _ in rows if item.status == Status.RUNNING
                        and item.lease_expires_at is not None and item.lease_expires_at > now}
                if not busy or time.monotonic() > deadline:
                    return self._take(session, batch, rows, busy, model_sha256)
            time.sleep(min(1.0, self.lease_s / 4))

    def _take(self, session: Session, batch: Batch, rows: Sequence[Any], busy: set[int],
              model_sha256: str) -> list[Work]:
        now = utcnow()
        order = {item_id: n for n, item_id in enumerate(batch.item_ids)}
        work = []
        gave_up = set()
        for item, sha256 in sorted(rows, key=lambda row: order[row[0].id]):
            if item.status in FINISHED or item.id in busy:
                continue
            if sha256 != model_sha256:
                log.warning("item %s is for model %s, this worker holds %s; left for reconcile",
                            item.id, short_hash(sha256), short_hash(model_sha256))
                continue
            if item.attempts >= self.max_attempts:
                item.status, item.lease_expires_at, item.finished_at = Status.FAILED, None, now
                item.last_error = (f"gave up after {item.attempts} attempts; last error: "
                                   f"{item.last_error or 'worker lost during the batch'}")
                gave_up.add(item.job_id)
                continue
            try:
                params = item.params
            except ParamError as exc:  # recorded by something that skipped the checks
                item.status, item.finished_at, item.last_error = Status.FAILED, now, str(exc)
                item.lease_expires_at = None
                gave_up.add(item.job_id)
                continue
            item.status, item.attempts = Status.RUNNING, item.attempts + 1
            item.lease_expires_at = now + timedelta(seconds=self.lease_s)
            item.worker_host, item.started_at, item.batch_id = self.worker_name, now, batch.id
            work.append(Work(item.id, item.job_id, item.row_index, params, item.attempts))
        session.flush()
        _finish_jobs(session, gave_up)
        return work

    # -- generating ---------------------------------------------------------------------

    def _generate(self, pipe: Pipeline, batch_id: str, work: list[Work], report: RunReport,
                  on_step: Callable[[int, int, int], None] | None = None) -> Iterator[Chunk]:
        """Denoise the claimed items in chunks of one shape and at most `micro_batch` items.

        On CUDA out-of-memory the chunk is halved, and so is `micro_batch` for what follows:
        a worker that ran out once would only run out again at the old size.
        """
        groups = [list(g) for _, g in groupby(sorted(work, key=lambda w: w.shape), key=lambda w: w.shape)]
        queue = [g[i:i + (self.micro_batch or len(g))] for g in groups
                 for i in range(0, len(g), self.micro_batch or len(g))]
        whole = len(queue) == 1
        while queue:
            items = queue.pop(0)
            requests = [w.params.request for w in items]
            start = time.perf_counter()
            try:
                steps = None if on_step is None else partial(on_step, len(items))
                images = pipe.generate(requests, **items[0].shape.settings(), on_step=steps)
            except torch.OutOfMemoryError:
                if len(items) == 1:
                    raise
                torch.cuda.empty_cache()
                half = len(items) // 2
                self.micro_batch = half
                log.warning("CUDA out of memory at batch size %d; continuing at %d", len(items), half)
                queue[:0] = [items[i:i + half] for i in range(0, len(items), half)]
                whole = False
                continue
            except ValueError as exc:
                ids, reason = [w.id for w in items], str(exc)
                report.failed += self._retrying("failing items", lambda: self._fail(ids, reason))
                continue
            chunk_id = batch_id if whole else f"{batch_id}.{items[0].row_index}"
            yield Chunk(chunk_id, tuple(items), tuple(images), time.perf_counter() - start)

    # -- storing ------------------------------------------------------------------------

    def _store(self, chunk: Chunk, environment: Environment,
               on_recorded: Callable[[int], None] | None) -> int:
        """Encode, watermark, upload and record one chunk (or part of one); returns how many
        were recorded."""
        pipe = self.pipeline()
        pngs = [
            encode_png(image, Provenance(
                params=w.params, model_sha256=pipe.sha256, model_name=pipe.name, environment=environment,
                job_id=w.job_id, item_id=w.id, row=w.row_index, batch_id=chunk.batch_id,
                batch_position=chunk.first + position,
            ), watermark=self.watermark, level=self.png_level)
            for position, (w, image) in enumerate(zip(chunk.items, chunk.images))
        ]
        try:
            recorded = self._retrying("storing images", lambda: self._record(chunk, pngs))
        except TransientError as exc:
            ids, reason = [w.id for w in chunk.items], str(exc)
            self._retrying("handing items back", lambda: self._release(ids, last_error=reason[:2000]))
            raise
        with self._done_lock:
            self.images_done += recorded
        if on_recorded:
            on_recorded(recorded)
        return recorded

    def _record(self, chunk: Chunk, pngs: list[EncodedPng]) -> int:
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
        keys = [image_key(w.job_id, w.id, w.attempt) for w in chunk.items]
        for key, png in zip(keys, pngs):
            self.storage.put(key, png.data)
        share = chunk.seconds / len(chunk.items)
        with self.sessions.begin() as session:
            found = {row.id: row for row in session.execute(
                select(Item.id, Item.status, Item.attempts, Item.image_key)
                .where(Item.id.in_([w.id for w in chunk.items])).with_for_update())}
            ours = {w.id for w in chunk.items if w.id in found
                    and (found[w.id].status, found[w.id].attempts) == (Status.RUNNING, w.attempt)}
            rows = [{"id": w.id, "status": Status.DONE, "image_key": key,
                     "image_sha256": png.sha256, "watermark": png.watermark,
                     "batch_id": chunk.batch_id, "batch_position": chunk.first + position,
                     "device": self.pipeline().device, "lease_expires_at": None,
                     "last_error": None, "finished_at": utcnow(), "duration_s": share}
                    for position, (w, key, png) in enumerate(zip(chunk.items, keys, pngs))
                    if w.id in ours]
            if rows:
                session.execute(update(Item), rows)
            _finish_jobs(session, {w.job_id for w in chunk.items})
        for w, key in zip(chunk.items, keys):
            if w.id in ours:
                self._delete([image_key(w.job_id, w.id, n) for n in range(1, w.attempt)])
            elif w.id not in found or found[w.id].image_key != key:  # not our earlier commit
                self._delete([key])
        return len(rows)

    def _delete(self, keys: Sequence[str]) -> None:
        """Remove objects no row points to; one left behind is only wasted space."""
        for key in keys:
            try:
                self.storage.delete(key)
            except StorageError as exc:
                log.warning("could not delete unrecorded image %s: %s", key, exc)

    # -- state changes for failures -----------------------------------------------------

    def _fail(self, ids: Sequence[int], reason: str) -> int:
        """Permanent failure: the items will not succeed by retrying (bad model, bad input)."""
        log.error("failing %d item(s): %s", len(ids), reason)
        with self.sessions.begin() as session:
            stmt = (update(Item).where(Item.id.in_(ids), Item.status.not_in(FINISHED))
                    .values(status=Status.FAILED, last_error=reason[:2000], lease_expires_at=None,
                            finished_at=utcnow()))
            count = session.execute(stmt).rowcount
            jobs = set(session.scalars(select(Item.job_id).where(Item.id.in_(ids)).distinct()))
            _finish_jobs(session, jobs)
        return count

    def _release(self, ids: Sequence[int], **values: Any) -> None:
        """Hand the items still running back to the queue, their lease dropped and `values` set."""
        with self.sessions.begin() as session:
            session.execute(update(Item).where(Item.id.in_(ids), Item.status == Status.RUNNING)
                            .values(status=Status.QUEUED, lease_expires_at=None, **values))

    def _retrying(self, what: str, action: Callable[[], Any]) -> Any:
        """`action`, retried with exponential backoff on transient failures, up to
        `max_attempts` tries; then TransientError."""
        for attempt in range(1, self.max_attempts + 1):
            try:
                return action()
            except TRANSIENT as exc:
                if attempt == self.max_attempts:
                    raise TransientError(f"{what} failed {attempt} times: {exc}") from exc
                log.warning("%s failed (attempt %d of %d), retrying: %s", what, attempt,
                            self.max_attempts, exc)
                time.sleep(BACKOFF_S * 2 ** (attempt - 1))
        raise AssertionError("unreachable")


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
