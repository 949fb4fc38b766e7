"""Init images stored once by content, on both databases: a second submit of the same bytes
adds neither a row nor an object, a purge takes the image with the last item that points at
it, and a submit racing a purge never ends with an item whose init image is gone."""
from __future__ import annotations

import threading
from pathlib import Path

import pytest
from PIL import Image
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from sdq.db.models import InitImageFile, Item, Job
from sdq.db.queries import submit_job
from sdq.images.storage import LocalStorage, StorageError, init_key
from sdq.jobs import inits
from sdq.jobs.inits import InitSource, read_path
from sdq.jobs.maintenance import purge_job

from .helpers import spec


def photo(tmp_path: Path, colour: int = 40) -> InitSource:
    path = tmp_path / f"photo{colour}.png"
    Image.new("RGB", (64, 48), (colour, 90, 30)).save(path)
    return read_path(path, path.name)


def submit(session: Session, storage: LocalStorage, *starts: InitSource) -> int:
    """What `jobs.submit.submit` does with init images: upload, then rows with the items; the
    job's id."""
    inits.upload(storage, starts)
    inits.record(session, storage, starts)
    job = submit_job(session, Job(), [spec(init_sha256=s.sha256, init_source=s.source,
                                           strength=0.5) for s in starts])
    job_id = job.id  # read before the commit: reading after it would begin a transaction
    session.commit()
    return job_id


def rows(session: Session) -> list[str]:
    """The init_images rows, read in a session of its own (on SQLite every transaction holds
    the write lock, which a purge then waits on)."""
    with Session(session.get_bind()) as reading:
        return list(reading.scalars(select(InitImageFile.sha256).order_by(InitImageFile.sha256)))


class CountingStorage(LocalStorage):
    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.puts: list[str] = []

    def put(self, key: str, data: bytes, **options: object) -> None:  # type: ignore[override]
        self.puts.append(key)
        super().put(key, data, **options)  # type: ignore[arg-type]


def test_the_same_bytes_are_one_object_and_one_row(session: Session, tmp_path: Path) -> None:
    storage = CountingStorage(tmp_path / "store")
    first, second = photo(tmp_path, 40), photo(tmp_path, 41)
    submit(session, storage, first, second, first)
    submit(session, storage, second)
    assert rows(session) == sorted([first.sha256, second.sha256])
    assert sorted(storage.puts) == sorted([init_key(first.sha256), init_key(second.sha256)])
    with Session(session.get_bind()) as reading:
        row = reading.get(InitImageFile, first.sha256)
        assert (row.width, row.height, row.size_bytes) == (64, 48, first.size_bytes)
    assert storage.get(init_key(first.sha256)) == (tmp_path / "photo40.png").read_bytes()


def test_an_object_gone_before_its_row_is_written_is_put_back(session: Session,
                                                              tmp_path: Path) -> None:
    """A purge that deleted the image between this submit's upload and its rows."""
    storage = LocalStorage(tmp_path / "store")
    start = photo(tmp_path)
    inits.upload(storage, [start])
    storage.delete(init_key(start.sha256))
    inits.record(session, storage, [start])
    session.commit()
    assert rows(session) == [start.sha256] and storage.exists(init_key(start.sha256))


def test_purge_keeps_an_init_image_while_another_job_starts_from_it(session: Session,
                                                                    tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "store")
    shared, own = photo(tmp_path, 40), photo(tmp_path, 41)
    first = submit(session, storage, shared, own)
    second = submit(session, storage, shared)
    engine = session.get_bind()
    session.close()
    assert purge_job(engine, storage, first).inits == 1
    assert rows(session) == [shared.sha256]
    assert storage.exists(init_key(shared.sha256)) and not storage.exists(init_key(own.sha256))
    assert purge_job(engine, storage, second).inits == 1
    assert rows(session) == [] and list(storage.list("init/")) == []


class InitsUndeletable(LocalStorage):
    """A store that fails to delete init images (and nothing else)."""

    def delete(self, key: str) -> None:
        if key.startswith("init/"):
            raise StorageError(f"cannot delete {key}")
        super().delete(key)


def test_a_purge_whose_init_image_cannot_go_still_deletes_the_jobs_images(
        session: Session, tmp_path: Path) -> None:
    """Its rows are deleted at once, so a second purge could not find the images: they go
    now, and the error names what is left."""
    storage = InitsUndeletable(tmp_path / "store")
    start = photo(tmp_path)
    job_id = submit(session, storage, start)
    storage.put(f"{job_id}/1.png", b"an image")
    engine = session.get_bind()
    session.close()
    with pytest.raises(StorageError, match=f"job {job_id}'s rows are deleted, but not all"):
        purge_job(engine, storage, job_id)
    assert list(storage.list(f"{job_id}/")) == []
    assert storage.exists(init_key(start.sha256))


class SubmitDuringDelete(LocalStorage):
    """A store whose deletion of an init image (by a purge, holding its row lock) lets a
    submit of the same image run: its upload finds the object still there, then its rows
    wait on the purge's lock, in a thread, until the purge commits."""

    def __init__(self, root: Path, session: Session, start: InitSource) -> None:
        super().__init__(root)
        self.session, self.start = session, start
        self.thread: threading.Thread | None = None
        self.job: list[int] = []

    def delete(self, key: str) -> None:
        if key == init_key(self.start.sha256) and self.thread is None:
            inits.upload(self, [self.start])  # there: nothing to put
            self.thread = threading.Thread(target=lambda: self.job.append(
                submit(self.session, self, self.start)))
            self.thread.start()
            _until_waiting(self.session)
        super().delete(key)


def _until_waiting(session: Session) -> None:
    """Until the submit's thread waits on a lock (PostgreSQL shows it; SQLite's waits are in
    its busy handler, where it then stays until the purge commits, whenever it gets there)."""
    engine = session.get_bind()
    if engine.dialect.name != "postgresql":
        return
    with engine.connect() as connection:
        while not connection.execute(text("SELECT count(*) FROM pg_locks WHERE NOT granted")
                                     ).scalar():
            connection.rollback()


def test_a_submit_racing_a_purge_keeps_its_init_image(session: Session, tmp_path: Path) -> None:
    start = photo(tmp_path)
    doomed = submit(session, LocalStorage(tmp_path / "store"), start)
    engine = session.get_bind()
    session.close()
    storage = SubmitDuringDelete(tmp_path / "store", Session(engine), start)
    purge_job(engine, storage, doomed)
    assert storage.thread is not None
    storage.thread.join(timeout=120)
    [job] = storage.job
    with Session(engine) as check:
        pointing = check.scalar(select(func.count()).where(Item.init_sha256 == start.sha256))
    assert (pointing, rows(session)) == (1, [start.sha256])
    assert storage.get(init_key(start.sha256)) == (tmp_path / "photo40.png").read_bytes()
    storage.session.close()
    assert job != doomed
