"""A submission whose items name different models: each item keeps its model, and each
model's batches go to that model's queue (or run in-process on that model)."""
from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.torch import save_file
from sqlalchemy.orm import Session

from sdq.db.models import Model
from sdq.db.queries import register_model
from sdq.db.session import open_database
from sdq.worker.app import queue_name
from sdq.worker.config import Settings
from sdq.worker.provenance import read_png_metadata
from sdq.worker.storage import open_storage
from sdq.worker.submit import ModelIdentity, identify_model, submit
from tests.conftest import build_tiny_networks, ldm_checkpoint

from .conftest import in_queue, job_items, specs


@pytest.fixture(scope="session")
def other_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second tiny model, with other weights (so another hash)."""
    path = tmp_path_factory.mktemp("models") / "other-sd.safetensors"
    save_file(ldm_checkpoint(*build_tiny_networks(seed=1)), str(path))
    return path


def _register(settings: Settings, model: ModelIdentity, name: str) -> int:
    with Session(open_database(settings.database_url)) as session, session.begin():
        return register_model(session, sha256=model.sha256, name=name, source_uri=model.ref).id


def _mixed(default: ModelIdentity, other_id: int) -> list[dict[str, object]]:
    """Rows 0 and 2 on the default model, row 1 on the other one."""
    return [{**spec, "model_id": other_id} if n == 1 else spec
            for n, spec in enumerate(specs(3))]


def test_embedded_runs_each_item_on_its_own_model(embedded: Settings, tiny_checkpoint: Path,
                                                  other_checkpoint: Path) -> None:
    default, other = identify_model(tiny_checkpoint), identify_model(other_checkpoint)
    other_id = _register(embedded, other, "other")
    result = submit(embedded, _mixed(default, other_id), model=default, batch_size=8)
    assert result.report is not None and (result.report.done, result.report.failed) == (3, 0)
    assert (result.batches, result.queues) == (2, ())
    engine = open_database(embedded.database_url)
    storage = open_storage(embedded.storage_url)
    with Session(engine) as session:
        shas = {m.id: m.sha256 for m in session.query(Model)}
    items = job_items(engine, result.job_id)
    assert [shas[i.model_id] for i in items] == [default.sha256, other.sha256, default.sha256]
    for item in items:
        assert read_png_metadata(storage.get(item.image_key)).provenance.model_sha256 == \
            shas[item.model_id]


def test_distributed_sends_each_model_to_its_queue(distributed: Settings, tiny_checkpoint: Path,
                                                   other_checkpoint: Path) -> None:
    default, other = identify_model(tiny_checkpoint), identify_model(other_checkpoint)
    other_id = _register(distributed, other, "other")
    result = submit(distributed, _mixed(default, other_id), model=default, batch_size=8)
    assert set(result.queues) == {queue_name(default.sha256), queue_name(other.sha256)}
    assert result.queue is None
    broker = distributed.broker_url or ""
    assert [in_queue(broker, q) for q in result.queues] == [1, 1]
