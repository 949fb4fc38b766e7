"""The store queue: finished chunks handed to the store threads, at most a few at a time."""
from __future__ import annotations

import math
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Sequence

from PIL import Image

from sdq.worker.claims import Work

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

    def parts(self, count: int) -> list["Chunk"]:
        """The chunk cut into at most `count` runs of consecutive items, to be stored in
        parallel; each part carries its share of the denoising time."""
        size = math.ceil(len(self.items) / count)
        return [Chunk(self.batch_id, self.items[i:i + size], self.images[i:i + size],
                      self.seconds * len(self.items[i:i + size]) / len(self.items), self.first + i)
                for i in range(0, len(self.items), size)]


class StoreQueue:
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

    def __enter__(self) -> "StoreQueue":
        return self

    def __exit__(self, *exc: object) -> None:
        self.pool.shutdown(wait=True)
