"""The store side of the runner on a real index and image folder, with a stand-in model:
recording exactly once, the bounded queue, and (issue 22) the next message denoising while
the previous one is still being stored."""
from __future__ import annotations

import hashlib
import threading
from pathlib import Path
from typing import Any

from PIL import Image
from sqlalchemy import update
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from sdq.core.params import GenerationParams
from sdq.core.settings import Settings
from sdq.db.models import Item, Job, Status
from sdq.images.provenance import environment_fingerprint, read_png_metadata
from sdq.images.storage import LocalStorage, image_key
from sdq.worker.claims import Claims, Work
from sdq.worker.runner import Runner
from sdq.worker.store_queue import Chunk, StoreQueue, encode, record
from tests.fakes import FakePipeline

from .conftest import job_items, queued_job, specs

PIPE = FakePipeline("e" * 64)


def claimed(engine: Engine, count: int) -> tuple[int, list[Work]]:
    """A job of `count` items claimed by worker w1 (its lease keeper stopped at once)."""
    job_id, [batch] = queued_job(engine, PIPE.sha256, specs(count), 8, prefix="st")
    claims = Claims(sessionmaker(engine, expire_on_commit=False), worker_name="w1", lease_s=120,
                    max_attempts=3)
    try:
        return job_id, claims.take(batch, PIPE.sha256, lambda work: f"key-{work.params.seed}")
    finally:
        claims.close()


def stored(engine: Engine, storage: LocalStorage, work: list[Work]) -> int:
    """Encode the stand-in model's images of `work` as one chunk, and record them."""
    images = PIPE.generate([w.params.request for w in work], width=64, height=64)
    chunk = Chunk("st-0", tuple(work), tuple(images), seconds=2.0)
    verdicts = [None] * len(work)
    pngs = encode(chunk, verdicts, model=PIPE, environment=environment_fingerprint("cpu", "fp32"),
                  watermark=None, level=1)
    return record(sessionmaker(engine), storage, chunk, pngs, verdicts, device="cpu")


def test_recording_marks_the_claimed_items_done_with_their_stored_image(
        engine: Engine, storage: LocalStorage) -> None:
    job_id, work = claimed(engine, 2)
    assert stored(engine, storage, work) == 2
    rows = job_items(engine, job_id)
    assert [(r.status, r.image_key, r.batch_position, r.duration_s, r.lease_expires_at) for r in rows] == [
        (Status.DONE, f"{job_id}/{r.id}.png", n, 1.0, None) for n, r in enumerate(rows)]
    for row in rows:
        data = storage.get(row.image_key)
        assert hashlib.sha256(data).hexdigest() == row.image_sha256
        assert read_png_metadata(data).provenance.item_id == row.id
    with Session(engine) as session:
        assert session.get(Job, job_id).status == Status.DONE


def test_a_claim_lost_while_uploading_records_nothing_and_leaves_no_object(
        engine: Engine, storage: LocalStorage) -> None:
    job_id, work = claimed(engine, 1)
    with Session(engine) as session, session.begin():  # taken over: another claim, attempt 2
        session.execute(update(Item).values(attempts=2, worker_host="w2"))
    assert stored(engine, storage, work) == 0
    [row] = job_items(engine, job_id)
    assert (row.status, row.worker_host, row.image_key) == (Status.RUNNING, "w2", None)
    assert list(storage.list(f"{job_id}/")) == []


def test_a_later_attempt_that_records_removes_the_objects_of_earlier_ones(
        engine: Engine, storage: LocalStorage) -> None:
    job_id, [batch] = queued_job(engine, PIPE.sha256, specs(1), 8, prefix="late")
    with Session(engine) as session, session.begin():  # attempt 1 uploaded, then its worker died
        session.execute(update(Item).values(attempts=1))
    storage.put(image_key(job_id, batch.item_ids[0], 1), b"orphan")
    claims = Claims(sessionmaker(engine, expire_on_commit=False), worker_name="w1", lease_s=120,
                    max_attempts=3)
    try:
        work = claims.take(batch, PIPE.sha256, lambda work: "key")
    finally:
        claims.close()
    assert stored(engine, storage, work) == 1
    [row] = job_items(engine, job_id)
    assert row.image_key == image_key(job_id, row.id, 2)
    assert list(storage.list(f"{job_id}/")) == [row.image_key]


def test_a_chunk_is_cut_in_parts_that_keep_their_positions_and_time_share() -> None:
    work = tuple(Work(n, 1, n, GenerationParams("x", seed=n), 1) for n in range(5))
    images = tuple(Image.new("RGB", (8, 8)) for _ in work)
    parts = Chunk("b", work, images, seconds=10.0).parts(2)
    assert [(p.first, [w.id for w in p.items], p.seconds) for p in parts] == [
        (0, [0, 1, 2], 6.0), (3, [3, 4], 4.0)]


def test_the_queue_takes_another_chunk_only_when_one_is_stored() -> None:
    """Bound 1: the second chunk is taken only once the first is stored, so `put` of the
    second returns after the first's part ended (each part here ends when the test says)."""
    queue = StoreQueue(threads=2, bound=1)
    events: list[str] = []
    release = [threading.Event(), threading.Event()]
    put_first = threading.Event()

    def part(n: int) -> int:
        release[n].wait(60)
        events.append(f"stored {n}")
        return 1

    def produce() -> None:
        queue.put([lambda: part(0)])
        put_first.set()
        queue.put([lambda: part(1)])
        events.append("put 1")

    producer = threading.Thread(target=produce)
    producer.start()
    assert put_first.wait(60)
    release[0].set()
    producer.join(60)
    release[1].set()
    queue.close()
    assert events == ["stored 0", "put 1", "stored 1"]


class GatedStorage(LocalStorage):
    """Uploads wait until the test opens the gate; `waiting` is set once one is held there."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.gate, self.waiting = threading.Event(), threading.Event()

    def put(self, key: str, data: bytes, **options: Any) -> None:
        self.waiting.set()
        assert self.gate.wait(60), "the test never opened the gate"
        super().put(key, data, **options)


def test_the_next_message_denoises_while_the_last_one_is_stored(
        engine: Engine, embedded: Settings) -> None:
    """Issue 22: the worker's run returns once its chunks are queued, so the second message
    is denoised while the first one's upload is held; the first one's items stay claimed
    meanwhile, a delivery of it again is skipped, and `drain` (shutdown) stores both."""
    storage = GatedStorage(Path(embedded.storage_url))
    pipe = FakePipeline(PIPE.sha256)
    job_id, [first, second] = queued_job(engine, pipe.sha256, specs(4), 2, prefix="ov")
    runner = Runner(engine=engine, storage=storage, model_ref="", pipeline=pipe, store_threads=1,
                    worker_name="w1")
    try:
        assert runner.run([first], wait=False).done == 0
        assert storage.waiting.wait(60)
        runner.run([second], wait=False)
        pipe.wait_for_call(tuple(1000 + n for n in (2, 3)))  # the second message denoised
        assert not storage.gate.is_set()
        rows = {r.id: r for r in job_items(engine, job_id)}
        assert {(rows[i].status, rows[i].worker_host) for i in first.item_ids} == {
            (Status.RUNNING, "w1")}
        assert runner.claims.held() >= set(first.item_ids)  # their leases are renewed
        again = runner.run([first], wait=False)  # redelivered while still being stored
        assert (again.skipped, len(pipe.calls)) == (2, 2)
    finally:
        storage.gate.set()
        runner.drain()
    rows = job_items(engine, job_id)
    assert [(r.status, r.attempts) for r in rows] == [(Status.DONE, 1)] * 4
    assert sorted(storage.list(f"{job_id}/")) == sorted(r.image_key for r in rows)
    assert runner.images_done == 4
