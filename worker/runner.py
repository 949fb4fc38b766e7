"""The batch runner: the worker loop that takes a message's batches from claimed rows to stored,
recorded images.

One code path for both modes: a Celery task calls `Runner.run` with the batches its message
carries, and embedded mode calls it in-process. The database is the source of truth, so every
step is guarded by the item's row, which makes redelivered or duplicated messages harmless.
The parts, each in its own module:

- `cache`: before anything else, and before the model is loaded, items whose image is stored
  already are finished as reusing it;
- `claims`: claiming items (lease + attempt), the lease keeper thread, handing back what a run
  leaves;
- `sdmodel.produce`: denoising in micro-batches the device holds, halving on out-of-memory, a
  failing item isolated from the rest;
- `store_queue`: store threads that check, encode, watermark, upload and record finished
  chunks while the next ones denoise, at most a few chunks at a time;
- `outage`: storage and database failures are waited out, never charged to an item.

Image-to-image items start from an init image read from storage (`images.stored_init`), kept
in memory by sha256 for the next items that start from it; one that is missing or not as
recorded fails only its items.

A job that names a safety checker has each image scored on the store threads too; the checker
is loaded once per runner (per worker process), before the batch that first needs it is
denoised, and a job whose checker cannot be loaded fails its items instead of running them
unchecked.
"""
from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from pathlib import Path
from functools import partial
from typing import TYPE_CHECKING, Any

from PIL import Image
from sqlalchemy.engine import Engine
from sqlalchemy.orm import sessionmaker

from sdq.core.batch import Batch, RunReport
from sdq.core.jobspec import CHECKER_FAILED
from sdq.core.params import short_hash
from sdq.core.settings import DEFAULT_PNG_LEVEL, OUTAGE_S, default_store_threads
from sdq.db.session import read_only
from sdq.images.provenance import Environment, environment_fingerprint
from sdq.images.storage import Storage
from sdq.images.stored_init import InitImages, UnusableInit
from sdq.sdmodel.embeddings import embeddings_problem
from sdq.sdmodel.img2img import Init
from sdq.sdmodel.pipeline import load_pipeline
from sdq.sdmodel.produce import Denoiser, produce
from sdq.worker.cache import Identity, ResultCache, identify
from sdq.worker.claims import LEASE_S, Claims, Work
from sdq.worker.outage import TransientError, retrying
from sdq.worker.store_queue import QUEUED_CHUNKS, Chunk, StoreQueue, check, encode, record, settle

if TYPE_CHECKING:
    from sdq.sdmodel.safety import SafetyChecker

log = logging.getLogger(__name__)

OnRecorded = Callable[[int], None]
OnStep = Callable[[int, int, int], None]


class Runner:
    """Runs batches on one model, loaded on first use and kept for the life of the process."""

    def __init__(
        self, *, engine: Engine, storage: Storage, model_ref: str, device: str | None = None,
        dtype: str | None = None, vae_dtype: str | None = None, watermark: str | None = None,
        hash_cache: Any = None,
        max_attempts: int = 3, lease_s: float = LEASE_S, micro_batch: int | None = None,
        worker_name: str | None = None, pipeline: Denoiser | None = None,
        png_level: int = DEFAULT_PNG_LEVEL, store_threads: int | None = None, fast: str | None = None,
        outage_s: float = OUTAGE_S, lora_dirs: Sequence[Path] = (), embeddings_dir: Path | None = None,
    ) -> None:
        """`pipeline`: one already loaded (benchmarks, tests); otherwise `model_ref` is loaded
        on the first run, with the fast path `fast` (a `FastPath.parse` string), LoRAs looked
        up in `lora_dirs` and embeddings in `embeddings_dir`.
        `store_threads`: None for one per core, up to 8. `vae_dtype`: the autoencoder's
        dtype (`SDQ_VAE_DTYPE`; None: `dtype`)."""
        # Every runner transaction reads rows, then writes them: on SQLite it takes the write
        # lock up front (engine_from_url's default, the role FOR UPDATE plays on PostgreSQL),
        # so store threads recording at once queue on the busy timeout; the cache lookups
        # only read.
        self.sessions = sessionmaker(engine, expire_on_commit=False)
        self.storage = storage
        self.model_ref, self.device, self.dtype = model_ref, device, dtype
        self.vae_dtype = vae_dtype
        self.watermark, self.hash_cache = watermark, hash_cache
        self.micro_batch, self.outage_s = micro_batch, outage_s
        self.worker_name = worker_name or socket.gethostname()
        self.png_level = png_level
        self.store_threads = store_threads or default_store_threads()
        self.claims = Claims(self.sessions, worker_name=self.worker_name, lease_s=lease_s,
                             max_attempts=max_attempts)
        self.cache = ResultCache(sessionmaker(read_only(engine)), self.sessions, storage,
                                 watermark=watermark, worker_name=self.worker_name,
                                 hash_cache=hash_cache)
        self.current_batch: str | None = None
        self.images_done = 0
        """Images this runner generated and recorded (reused ones not counted)."""
        self.images_reused = 0
        self._done_lock = threading.Lock()  # store threads add to `images_done` at once
        self._pipeline = pipeline
        self.fast = fast
        self.lora_dirs, self.embeddings_dir = tuple(lora_dirs), embeddings_dir
        self._checkers: dict[str, SafetyChecker] = {}
        """Safety checkers by the reference jobs name them with, loaded once, on first use."""
        self._queue: StoreQueue | None = None
        self.inits = InitImages(storage)
        """Init images read lately, by sha256: a job starts many items from each."""

    def pipeline(self) -> Denoiser:
        if self._pipeline is None:
            self._pipeline = load_pipeline(self.model_ref, device=self.device, dtype=self.dtype,
                                           vae_dtype=self.vae_dtype, hash_cache=self.hash_cache,
                                           fast=self.fast, lora_dirs=self.lora_dirs,
                                           embeddings_dir=self.embeddings_dir)
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

    def run(self, batches: Sequence[Batch], on_recorded: OnRecorded | None = None,
            on_step: OnStep | None = None, *, wait: bool = True) -> RunReport:
        """Run every batch. `on_recorded(n)` after n images are stored; `on_step(images, i,
        steps)` as the images denoised together reach step i, for progress between chunks.
        With `wait` it returns once every image is recorded; without (the worker's task), once
        every chunk is queued for storing, so that the next message denoises while they are
        stored: their leases are kept until their rows are written, and `drain` waits for
        them. Every item ends done, failed with its reason, or handed back:

        - a model that cannot be loaded, for any reason, fails the items (one attempt each);
        - an error while generating fails the items it concerns, the rest go on;
        - storage or the database down longer than the outage window raises TransientError,
          and whatever is left (including what a crash leaves) is handed back: infrastructure
          failures and interruptions without counting the attempt, anything else with its
          reason in `last_error`.
        """
        report = RunReport()
        reused = self._reuse(batches, report, on_recorded)
        left = [i for batch in batches for i in batch.item_ids if i not in reused]
        pipe = self._load(left, report) if left else None
        if pipe is None:
            return report
        environment = environment_fingerprint(pipe.device, pipe.dtype, vae_dtype=pipe.vae_dtype)
        claimed: list[int] = []
        stores: list[Future[int]] = []
        try:
            for batch in batches:
                work = self._claim(batch, reused, pipe, report)
                claimed.extend(w.id for w in work)
                for chunk in self._denoise(pipe, batch.id, work, report, on_step):
                    stores += self._store_queue().put(
                        [partial(self._store, part, environment, on_recorded)
                         for part in chunk.parts(self.store_threads)])
                self.current_batch = None
            if wait:
                report.done += _stored(stores)
        except BaseException as exc:
            settle(stores)  # what is stored stays stored; the rest goes back
            self.claims.give_back(claimed, exc)
            raise
        finally:
            self.current_batch = None
            if wait:
                self.drain()
        return report

    def drain(self) -> None:
        """Wait until every chunk queued for storing is recorded (or handed back), then stop
        the store threads and the lease keeper: at the end of a run that waits, and when the
        worker process shuts down."""
        if self._queue is not None:
            self._queue.close()
            self._queue = None
        self.claims.close()

    # -- the steps of a run ---------------------------------------------------------------

    def _reuse(self, batches: Sequence[Batch], report: RunReport,
               on_recorded: OnRecorded | None) -> set[int]:
        """The result cache first, without loading the model: a message whose images are all
        stored already costs no model load."""
        model = identify(self._pipeline, self.model_ref, device=self.device, dtype=self.dtype,
                         vae_dtype=self.vae_dtype, hash_cache=self.hash_cache)
        reused = set() if model is None else retrying(
            "reusing stored images", lambda: self.cache.reuse(batches, model), self.outage_s)
        report.done, report.reused = len(reused), len(reused)
        self.images_reused += len(reused)
        if on_recorded and reused:
            on_recorded(len(reused))
        return reused

    def _load(self, ids: Sequence[int], report: RunReport) -> Denoiser | None:
        """The model; if it cannot be loaded, for any reason, the items fail (one attempt each)."""
        try:
            return self.pipeline()
        except Exception as exc:  # noqa: BLE001 - any load failure is the model's, recorded
            reason = f"model: {exc}"
            report.failed += retrying("failing items", lambda: self.claims.fail(
                ids, reason, count_attempt=True), self.outage_s)
            return None

    def _claim(self, batch: Batch, reused: set[int], pipe: Denoiser, report: RunReport) -> list[Work]:
        """The batch's items this run takes: claimed, their safety checkers loaded."""
        left = [i for i in batch.item_ids if i not in reused]
        if not left:
            return []
        self.current_batch = batch.id
        key_of = retrying("reading the jobs' safety checkers",
                          lambda: self.cache.key_of(left, Identity.of(pipe)), self.outage_s)
        work = retrying("claiming items", lambda: self.claims.take(
            batch, pipe.sha256, key_of, self.model_ref), self.outage_s)
        report.skipped += len(left) - len(work)
        return self._with_checkers(work, report)

    def _with_checkers(self, work: list[Work], report: RunReport) -> list[Work]:
        """The claimed items whose safety checker loads; the others fail with the reason (a
        job that asked for a check never runs without one)."""
        failed: dict[str, str] = {}
        for ref in {w.safety_checker for w in work if w.safety_checker}:
            try:
                self.safety_checker(ref)
            except Exception as exc:  # noqa: BLE001 - any load failure, as for the model
                failed[ref] = f"{CHECKER_FAILED}{exc}"
        return self._fail_each(work, {w.id: failed[w.safety_checker] for w in work
                                      if w.safety_checker in failed}, report)

    def _denoise(self, pipe: Denoiser, batch_id: str, work: list[Work], report: RunReport,
                 on_step: OnStep | None) -> Iterator[Chunk]:
        """The claimed items as chunks of images (`produce`), each recorded under the batch's
        id when it ran whole, else under `BATCH.ROW` of its first item; an item that fails
        alone is failed with the reason."""
        work = self._with_embeddings(pipe, work, report)
        work, inits = self._with_inits(work, report)
        loras = [w.lora_set for w in work] if any(w.loras for w in work) else None
        for produced in produce(pipe, [w.params for w in work], batch_size=self.micro_batch,
                                on_step=on_step, on_smaller=self._smaller, isolate=True,
                                loras=loras, inits=inits if any(inits) else None):
            items = tuple(work[i] for i in produced.indices)
            if produced.error is not None:
                ids, reason = [w.id for w in items], produced.error
                report.failed += retrying("failing items", lambda: self.claims.fail(ids, reason),
                                          self.outage_s)
                continue
            chunk_id = batch_id if len(items) == len(work) else f"{batch_id}.{items[0].row_index}"
            yield Chunk(chunk_id, items, produced.images, produced.seconds,
                        redecoded=frozenset(produced.redecoded))

    def _with_embeddings(self, pipe: Denoiser, work: list[Work], report: RunReport) -> list[Work]:
        """The items whose prompts name here the embeddings they recorded, with the recorded
        sha256; the others fail with the reason (`embeddings_problem`)."""
        registry = getattr(pipe, "embeddings", None)
        failed: dict[int, str] = {}
        for w in work:
            if registry is None and not w.embeddings:
                continue
            p = w.params
            reason = embeddings_problem(registry, [p.prompt, p.negative_prompt], p.prompt_syntax,
                                        w.embeddings)
            if reason is not None:
                failed[w.id] = reason
        return self._fail_each(work, failed, report)

    def _with_inits(self, work: list[Work], report: RunReport) -> tuple[list[Work], list[Init | None]]:
        """The items whose init image reads from storage, each beside its `Init` (None for
        text-to-image); the others fail with the reason (`UnusableInit`). Read here, after the
        claim's transaction and outside any other; storage outages are waited out."""
        images: dict[str, Image.Image] = {}
        failed: dict[str, str] = {}
        for sha256 in dict.fromkeys(w.init.sha256 for w in work if w.init):
            try:
                images[sha256] = retrying(f"reading init image {short_hash(sha256)}",
                                          partial(self.inits.get, sha256), self.outage_s)
            except UnusableInit as exc:
                failed[sha256] = str(exc)
        kept = self._fail_each(work, {w.id: failed[w.init.sha256] for w in work
                                      if w.init and w.init.sha256 in failed}, report)
        return kept, [Init(images[w.init.sha256], w.init.strength) if w.init else None
                      for w in kept]

    def _fail_each(self, work: list[Work], reasons: dict[int, str], report: RunReport) -> list[Work]:
        """`work` less the items in `reasons`, each failed with its reason (one statement per
        reason, storage and database outages waited out)."""
        for reason in set(reasons.values()):
            ids = [i for i, why in reasons.items() if why == reason]
            report.failed += retrying("failing items", partial(self.claims.fail, ids, reason),
                                      self.outage_s)
        return [w for w in work if w.id not in reasons]

    def _smaller(self, size: int) -> None:
        """Out of memory lowered the micro-batch: keep it lower for what follows."""
        self.micro_batch = size

    def _store_queue(self) -> StoreQueue:
        if self._queue is None:
            self._queue = StoreQueue(self.store_threads, QUEUED_CHUNKS)
        return self._queue

    def _store(self, chunk: Chunk, environment: Environment, on_recorded: OnRecorded | None) -> int:
        """Check, encode, watermark, upload and record one chunk (or part of one), on a store
        thread; how many were recorded. Whatever it does not record is handed back."""
        pipe = self.pipeline()
        ids = [w.id for w in chunk.items]
        try:
            verdicts = check(chunk, self.safety_checker)
            pngs = encode(chunk, verdicts, model=pipe, environment=environment,
                          watermark=self.watermark, level=self.png_level)
            recorded = retrying("storing images", lambda: record(
                self.sessions, self.storage, chunk, pngs, verdicts, device=pipe.device), self.outage_s)
        except TransientError as outage:
            retrying("handing items back", partial(self.claims.hand_back, ids, outage), self.outage_s)
            raise
        except BaseException as exc:
            log.error("storing %d image(s) failed: %s: %s", len(ids), type(exc).__name__, exc)
            self.claims.give_back(ids, exc)
            raise
        finally:
            self.claims.let_go(ids)
        with self._done_lock:
            self.images_done += recorded
        if on_recorded:
            on_recorded(recorded)
        return recorded


def _stored(stores: Sequence[Future[int]]) -> int:
    """How many images the store threads recorded; the first outage that outlasted the window
    is raised once all are over (their items are back in the queue), anything else at once."""
    recorded, outages = 0, []
    for future in stores:
        try:
            recorded += future.result()
        except TransientError as exc:
            outages.append(exc)
    if outages:
        raise outages[0]
    return recorded
