"""Claims: a worker's hold on the items it runs.

- Claiming an item takes a lease (`status = running`, `lease_expires_at`) and bumps its
  `attempts`; items done, failed or cancelled are skipped, and items under another live lease
  are waited for (their holder may be alive) until that lease runs out.
- A lease keeper thread renews the leases of every item the worker holds, until its row is
  written (done, failed or handed back), so only a lost worker's items expire. That includes
  items whose images are still on the store threads after their message returned.
- Whatever a run leaves unfinished is handed back: queued again, with the attempt given back
  when the run was interrupted or outlasted an outage, kept (with the reason) otherwise.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from sdq.core.batch import Batch
from sdq.core.init_image import InitImage
from sdq.core.params import BatchShape, GenerationParams
from sdq.sdmodel.modelfiles import model_changed
from sdq.core.states import FINISHED
from sdq.db.base import utcnow
from sdq.db.transitions import (
    claim_item,
    fail_item,
    fail_items,
    finish_jobs,
    give_up_item,
    leased,
    lock_for_claim,
    release_items,
    renew_leases,
)
from sdq.worker.outage import TRANSIENT, TransientError

log = logging.getLogger(__name__)

LEASE_S = 120
"""How long a claim lasts without renewal: the longest a redelivered batch whose worker died
waits before taking the items over. Capped by the broker's visibility timeout, so a lost
machine's items are free by the time its message comes back."""


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
    loras: tuple[dict[str, Any], ...] = ()
    """The LoRAs the item records: {name, weight, sha256, a1111}."""
    embeddings: tuple[dict[str, Any], ...] = ()
    """The embeddings its prompts name: {name, sha256}."""
    init: InitImage | None = None
    """Image-to-image: the init image (by sha256, read from `storage.init_key`) and strength."""

    @property
    def shape(self) -> BatchShape:
        """What items must share to be denoised in one batch."""
        return self.params.shape

    @property
    def lora_set(self) -> tuple[tuple[str, float, str | None], ...]:
        """The LoRAs as `Pipeline.generate(loras=...)` takes them: (name, weight, sha256)."""
        return tuple((lora["name"], lora["weight"], lora["sha256"]) for lora in self.loras)


KeyOf = Callable[[Work], str | None]
"""A claimed item's cache key, from its parameters, LoRAs, embeddings and its job's safety
checker and on_flag (None: a checker that cannot be found, whose items then fail)."""


class Claims:
    """One worker's claims, under its name (`worker_host` on the rows it holds)."""

    def __init__(self, sessions: sessionmaker[Session], *, worker_name: str, lease_s: float,
                 max_attempts: int) -> None:
        self.sessions, self.worker_name = sessions, worker_name
        self.lease_s, self.max_attempts = lease_s, max_attempts
        self._keeper: LeaseKeeper | None = None

    def take(self, batch: Batch, model_sha256: str, key_of: KeyOf, model_ref: str = "") -> list[Work]:
        """Claim the batch's free items for the model `model_sha256`, each recording its cache
        key (`key_of(work)`, from what was read and hashed before the transaction: it makes no
        call), and keep their leases from now on. Items under
        another worker's live lease are waited for until it runs out; this worker's own (their
        images still being stored, the batch delivered twice) are skipped at once. Items
        recorded for another model fail, naming `model_ref`: their queue is this model's, so
        its file changed since they were submitted, and other weights must not make images
        recorded under their hash."""
        deadline = time.monotonic() + self.lease_s + 1
        while True:
            ours = self.held()
            with self.sessions.begin() as session:
                rows = lock_for_claim(session, batch.item_ids)
                now = utcnow()
                busy = {item.id for item, *_ in rows if leased(item.status, item.lease_expires_at, now)}
                if not busy - ours or time.monotonic() > deadline:
                    work = self._take(session, batch, rows, busy, model_sha256, key_of, model_ref)
                    break
            time.sleep(min(1.0, self.lease_s / 4))
        self._lease_keeper().hold(w.id for w in work)
        return work

    def _take(self, session: Session, batch: Batch, rows: Sequence[Any], busy: set[int],
              model_sha256: str, key_of: KeyOf, model_ref: str) -> list[Work]:
        now = utcnow()
        order = {item_id: n for n, item_id in enumerate(batch.item_ids)}
        work = []
        closing = set()
        for item, sha256, checker, on_flag in sorted(rows, key=lambda row: order[row[0].id]):
            if item.status in FINISHED or item.id in busy:
                continue
            if sha256 != model_sha256:
                fail_item(item, model_changed(model_ref, sha256, model_sha256), now)
                closing.add(item.job_id)
                continue
            if item.attempts >= self.max_attempts:
                give_up_item(item, now)
                closing.add(item.job_id)
                continue
            try:
                params, init = item.params, InitImage.of(item)
            except ValueError as exc:  # recorded by something that skipped the checks
                fail_item(item, str(exc), now)
                closing.add(item.job_id)
                continue
            # `attempt`: this claim's number, as claiming counts it.
            taken = Work(item.id, item.job_id, item.row_index, params, item.attempts + 1,
                         checker, on_flag, tuple(item.loras or ()), tuple(item.embeddings or ()),
                         init)
            claim_item(item, worker_host=self.worker_name, batch_id=batch.id,
                       lease_s=self.lease_s, cache_key=key_of(taken), now=now)
            work.append(taken)
        session.flush()
        finish_jobs(session, closing)
        return work

    def fail(self, ids: Collection[int], reason: str, *, count_attempt: bool = False) -> int:
        """Permanent failure: the items will not succeed by retrying (bad model, bad input,
        too big for this worker's memory); how many failed."""
        log.error("failing %d item(s): %s", len(ids), reason)
        with self.sessions.begin() as session:
            return fail_items(session, ids, reason, count_attempt=count_attempt)

    def hand_back(self, ids: Collection[int], error: BaseException) -> None:
        """Queue again the items of `ids` this worker still runs, after `error` ended their
        run. Interruptions (Ctrl-C, shutdown) and outages are not the item's fault: the
        attempt is given back. Anything else counts, with its reason, so a crash that repeats
        ends in "gave up after N attempts" instead of a loop."""
        if not ids:
            return
        interrupted = isinstance(error, (KeyboardInterrupt, SystemExit))
        why = None if interrupted else str(error) if isinstance(error, TransientError) \
            else f"{type(error).__name__}: {error}"
        with self.sessions.begin() as session:
            release_items(session, ids, worker_host=self.worker_name, last_error=why,
                          give_back_attempt=interrupted or isinstance(error, TransientError))

    def give_back(self, ids: Collection[int], error: BaseException) -> None:
        """`hand_back`, and stop renewing the leases whatever happens: with the database down
        too, they run out and the workers' reconcile takes the items."""
        try:
            self.hand_back(ids, error)
        except TRANSIENT as exc:
            log.warning("could not hand %d item(s) back, their leases will run out: %s",
                        len(ids), exc)
        finally:
            self.let_go(ids)

    def let_go(self, ids: Collection[int]) -> None:
        """Stop renewing the leases of `ids`: their rows are written, or left to the lease."""
        if self._keeper is not None:
            self._keeper.drop(ids)

    def held(self) -> set[int]:
        """The items whose leases this worker keeps: claimed, their rows not yet written."""
        return set() if self._keeper is None else self._keeper.held()

    def _lease_keeper(self) -> LeaseKeeper:
        if self._keeper is None:
            self._keeper = LeaseKeeper(self.sessions, self.worker_name, self.lease_s)
            self._keeper.start()
        return self._keeper

    def close(self) -> None:
        """Stop renewing (every row is written, or is left to its lease)."""
        if self._keeper is not None:
            self._keeper.stop()
            self._keeper = None


class LeaseKeeper(threading.Thread):
    """Renews the leases of the items a worker holds, every third of the lease. An item drops
    out once the renewal finds its row no longer running under this worker."""

    def __init__(self, sessions: sessionmaker[Session], worker_name: str, lease_s: float) -> None:
        super().__init__(name="sdq-lease", daemon=True)
        self.sessions, self.worker_name, self.lease_s = sessions, worker_name, lease_s
        self.ids: set[int] = set()
        self.lock = threading.Lock()
        self.stopped = threading.Event()

    def hold(self, ids: Iterable[int]) -> None:
        with self.lock:
            self.ids.update(ids)

    def drop(self, ids: Iterable[int]) -> None:
        with self.lock:
            self.ids.difference_update(ids)

    def held(self) -> set[int]:
        with self.lock:
            return set(self.ids)

    def renew(self) -> None:
        ids = self.held()
        if not ids:
            return
        with self.sessions.begin() as session:
            live = renew_leases(session, ids, worker_host=self.worker_name, lease_s=self.lease_s)
        with self.lock:
            self.ids -= ids - live

    def run(self) -> None:
        while not self.stopped.wait(self.lease_s / 3):
            try:
                self.renew()
            except OperationalError as exc:  # the next renewal may get through; the lease has slack
                log.warning("lease renewal failed: %s", exc)

    def stop(self) -> None:
        self.stopped.set()
        self.join(timeout=30)
