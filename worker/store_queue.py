"""The store side of the runner: finished chunks go to store threads that check, encode,
watermark, upload and record them while the model denoises the next ones.

Each chunk is cut in parts so that all threads work on it. At most `QUEUED_CHUNKS` finished
chunks wait or are being stored; `StoreQueue.put` blocks the generator beyond that, so memory
stays flat when storage is slow. The queue lives as long as its runner: a message's run
returns once its chunks are queued, and the next message denoises while they are stored.

Storing uploads first, under a key derived from the item and the attempt, then records the
image in a short transaction only if this claim (the same `attempts`) still holds the row; a
claim lost meanwhile deletes its own object and records nothing (`record`).
"""
from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from PIL import Image
from sqlalchemy.orm import Session, sessionmaker

from sdq.db.transitions import record_done
from sdq.images.provenance import EncodedPng, Environment, Provenance, SafetyVerdict
from sdq.images.safety import encode_judged, judge
from sdq.images.storage import Storage, StorageError, image_key
from sdq.sdmodel.produce import Denoiser
from sdq.worker.claims import Work

if TYPE_CHECKING:
    from sdq.sdmodel.safety import SafetyChecker

log = logging.getLogger(__name__)

QUEUED_CHUNKS = 2
"""Finished chunks held for storing at most: one being stored and one ready, so the store
threads never wait on the GPU while storage keeps up, and memory stays flat when it does not."""


@dataclass(frozen=True)
class Chunk:
    """Items actually denoised together, with the id and positions they are recorded under."""

    batch_id: str
    items: tuple[Work, ...]
    images: tuple[Image.Image, ...]
    seconds: float
    first: int = 0
    """Batch position of the first item: a part of a chunk keeps its items' positions."""
    redecoded: frozenset[int] = frozenset()
    """Positions, in `images`, of those decoded again in float32 (recorded in provenance)."""

    def parts(self, count: int) -> list["Chunk"]:
        """The chunk cut into at most `count` runs of consecutive items, to be stored in
        parallel; each part carries its share of the denoising time."""
        size = math.ceil(len(self.items) / count)
        return [Chunk(self.batch_id, self.items[i:i + size], self.images[i:i + size],
                      self.seconds * len(self.items[i:i + size]) / len(self.items), self.first + i,
                      frozenset(n - i for n in self.redecoded if i <= n < i + size))
                for i in range(0, len(self.items), size)]


class StoreQueue:
    """Store threads fed with finished chunks, at most `bound` chunks at a time: `put` blocks
    the generator while that many are waiting or being stored, so a slow store holds back the
    GPU instead of piling decoded images up in memory."""

    def __init__(self, threads: int, bound: int) -> None:
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="sdq-store")
        self.slots = threading.Semaphore(bound)

    def put(self, parts: Sequence[Callable[[], int]]) -> list[Future[int]]:
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

        futures = [self.pool.submit(part) for part in parts]
        for future in futures:
            future.add_done_callback(part_done)
        return futures

    def close(self) -> None:
        """Wait for every chunk put so far to be stored (or to fail), then stop the threads."""
        self.pool.shutdown(wait=True)


def settle(futures: Sequence[Future[Any]]) -> None:
    """Wait for `futures` to end, however they end."""
    wait(futures)


def check(chunk: Chunk, checker_of: Callable[[str], SafetyChecker]) -> list[SafetyVerdict | None]:
    """Each image's verdict from its job's checker (None where the job has none), and the
    action its job's `on_flag` takes: one call per checker for the chunk's images, on a store
    thread, off the denoising path."""
    verdicts: list[SafetyVerdict | None] = [None] * len(chunk.items)
    for ref in {w.safety_checker for w in chunk.items if w.safety_checker}:
        positions = [n for n, w in enumerate(chunk.items) if w.safety_checker == ref]
        judged = judge(checker_of(ref), [chunk.images[n] for n in positions],
                       [chunk.items[n].on_flag for n in positions])
        for n, verdict in zip(positions, judged):
            verdicts[n] = verdict
    return verdicts


def encode(chunk: Chunk, verdicts: Sequence[SafetyVerdict | None], *, model: Denoiser,
           environment: Environment, watermark: str | None, level: int) -> list[EncodedPng | None]:
    """Each image as the PNG to store, its provenance inside (None: dropped by its verdict):
    for image-to-image the init image and strength too, as `sdq generate` records them."""
    return [encode_judged(image, verdict, Provenance(
        params=w.params, model_sha256=model.sha256, model_name=model.name,
        environment=environment, job_id=w.job_id, item_id=w.id, row=w.row_index,
        batch_id=chunk.batch_id, batch_position=chunk.first + position, safety=verdict,
        redecoded="fp32" if position in chunk.redecoded else None,
        loras=w.loras, embeddings=w.embeddings, init=w.init,
    ), watermark=watermark, level=level)
        for position, (w, image, verdict) in enumerate(zip(chunk.items, chunk.images, verdicts))]


def record(sessions: sessionmaker[Session], storage: Storage, chunk: Chunk,
           pngs: Sequence[EncodedPng | None], verdicts: Sequence[SafetyVerdict | None], *,
           device: str) -> int:
    """Upload, then mark done, in one short transaction, the items this claim still holds;
    how many it marked.

    Nothing is uploaded under a row lock: uploads take as long as the network does, and a lock
    held meanwhile would keep every other writer of these rows (claims, `sdq cancel`,
    reconcile) waiting. The claim can therefore be lost during the upload (lease run out, item
    cancelled or taken over). That is safe because each attempt uploads to its own key
    (`image_key`): a retry of this call overwrites its own object, a lost claim's object never
    replaces the one the new holder records, and the check under lock decides which object the
    row points to. A lost claim deletes its object; a later attempt that records also deletes
    the objects of earlier ones, in case their worker died before cleaning up.
    """
    keys = [None if png is None else image_key(w.job_id, w.id, w.attempt)
            for w, png in zip(chunk.items, pngs)]
    for key, png in zip(keys, pngs):
        if key is not None and png is not None:
            storage.put(key, png.data)
    share = chunk.seconds / len(chunk.items)
    rows = [{"id": w.id, "image_key": key, "image_sha256": png.sha256 if png else None,
             "watermark": png.watermark if png else None, "batch_id": chunk.batch_id,
             "batch_position": chunk.first + position, "device": device, "duration_s": share,
             **_safety_columns(verdict)}
            for position, (w, key, png, verdict) in enumerate(zip(chunk.items, keys, pngs, verdicts))]
    with sessions.begin() as session:
        recorded = record_done(session, rows, {w.id: w.attempt for w in chunk.items},
                               {w.job_id for w in chunk.items})
    for w, key in zip(chunk.items, keys):
        if w.id in recorded.ids:
            _delete(storage, [image_key(w.job_id, w.id, n) for n in range(1, w.attempt)])
        elif key is not None and recorded.image_keys.get(w.id) != key:
            _delete(storage, [key])  # not our earlier commit
    return len(recorded.ids)


def _delete(storage: Storage, keys: Sequence[str]) -> None:
    """Remove objects no row points to; one left behind is only wasted space."""
    for key in keys:
        try:
            storage.delete(key)
        except StorageError as exc:
            log.warning("could not delete unrecorded image %s: %s", key, exc)


def _safety_columns(verdict: SafetyVerdict | None) -> dict[str, Any]:
    """An item's safety columns: all null when no check ran."""
    if verdict is None:
        return {"safety_flagged": None, "safety_scores": None, "safety_checker_sha256": None,
                "safety_action": None}
    return {"safety_flagged": verdict.flagged, "safety_scores": verdict.scores,
            "safety_checker_sha256": verdict.checker_sha256, "safety_action": verdict.action}
