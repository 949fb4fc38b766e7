"""A submission whose items name different models: each item keeps its model, and each
model's batches go to that model's queue (or run in-process on that model)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from safetensors.torch import save_file
from sqlalchemy.orm import Session

from sdq.cli.main import cli
from sdq.db.models import Model, Status
from sdq.db.queries import register_model
from sdq.db.session import open_database
from sdq.jobs.broker import queue_name
from sdq.images.provenance import read_png_metadata
from sdq.images.storage import open_storage
from sdq.jobs.lifecycle import cancel_job
from sdq.jobs.submit import ModelIdentity, identify_model, submit
from sdq.core.settings import Settings
from sdq.worker.factory import runner_from_settings
from tests.conftest import build_tiny_networks, ldm_checkpoint
from tests.services import clear_queues, in_queue

from .conftest import job_items, specs


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
    result = submit(embedded, _mixed(default, other_id), model=default, batch_size=8,
                    make_runner=runner_from_settings)
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
    broker = distributed.broker_url or ""
    queues = [queue_name(default.sha256), queue_name(other.sha256)]
    before = [in_queue(broker, q) for q in queues]  # other tests may have left messages
    result = submit(distributed, _mixed(default, other_id), model=default, batch_size=8)
    assert set(result.queues) == set(queues) and result.queue is None
    assert [in_queue(broker, q) - n for q, n in zip(queues, before)] == [1, 1]
    _clean_up(distributed, result.job_id, queues)


def test_sdq_submit_enqueues_a_file_and_returns(distributed: Settings,
                                                distributed_env: dict[str, str],
                                                tiny_checkpoint: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "p.txt"
    prompts.write_text("a boat\na fox\n")
    queue = queue_name(identify_model(tiny_checkpoint).sha256)
    before = in_queue(distributed.broker_url or "", queue)  # other tests may have left some
    result = CliRunner().invoke(cli, ["submit", str(prompts), "--model", str(tiny_checkpoint),
                                      "--width", "64", "--height", "64", "--steps", "2", "--json"],
                                env=distributed_env)
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert (record["items"], record["batches"], record["queues"]) == (2, 1, [queue])
    items = job_items(open_database(distributed.database_url), record["job_id"])
    assert {i.status for i in items} == {Status.QUEUED}
    assert in_queue(distributed.broker_url or "", queue) == before + 1
    _clean_up(distributed, record["job_id"], [queue])


def _clean_up(settings: Settings, job_id: int, queues: list[str]) -> None:
    """Leave no work behind for later tests' workers or reconciles (tests run one at a time,
    so what else is in these queues is left over too)."""
    cancel_job(settings, job_id)
    clear_queues(settings.broker_url or "", *queues)
