"""Several embedded runs at once on one SQLite file (three terminals, one `SDQ_HOME`): every
transaction that writes takes the lock up front, so each waits its turn on the busy timeout
instead of failing with "database is locked"."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from sdq.db.models import Item, Job, Status
from sdq.images.storage import open_storage

from .conftest import Home


def test_three_embedded_submits_on_one_file_all_finish(home: Home, tiny_checkpoint: Path) -> None:
    sdq = Path(sys.executable).parent / "sdq"
    runs = []
    for n in range(3):
        prompts = home.path / f"prompts{n}.txt"
        prompts.write_text("".join(f"run {n} image {i}\n" for i in range(4)))
        runs.append(subprocess.Popen(
            [str(sdq), "submit", str(prompts), "--model", str(tiny_checkpoint), "--width", "64",
             "--height", "64", "--steps", "1", "--batch-size", "1"],
            env={**home.env, "PATH": str(sdq.parent), "OMP_NUM_THREADS": "1"},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [run.communicate(timeout=600)[0] for run in runs]
    assert [run.returncode for run in runs] == [0, 0, 0], outputs
    with Session(home.engine) as session:
        jobs = session.scalars(select(Job)).all()
        items = session.scalars(select(Item)).all()
    assert sorted(j.status for j in jobs) == [Status.DONE] * 3
    assert len(items) == 12 and {i.status for i in items} == {Status.DONE}
    storage = open_storage(str(home.path / "home" / "images"))
    assert sorted(storage.list()) == sorted(i.image_key for i in items)
