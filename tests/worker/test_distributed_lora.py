"""LoRAs in distributed mode: a worker finds them in its own SDQ_LORA_DIR, makes the items
whose file has the recorded sha256, fails those whose copy differs, and the stored PNGs (in S3)
carry the records."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from sdq.core.settings import Settings
from sdq.db.models import Status
from sdq.db.session import open_database
from sdq.images.provenance import read_png_metadata
from sdq.images.storage import open_storage
from sdq.jobs.adapters import AdapterFinder
from sdq.jobs.submit import identify_model, submit
from tests.adapters import write_loras

from .cluster import WorkerProcess
from .conftest import job_items, specs
from .test_distributed import wait_until_done


def test_a_worker_uses_its_own_lora_folder_and_checks_the_hash(
        distributed: Settings, distributed_env: dict[str, str],
        start_worker: Callable[[str], WorkerProcess], tiny_checkpoint: Path, tmp_path: Path) -> None:
    folder = tmp_path / "worker-loras"
    write_loras(folder, tiny_checkpoint, {"detail": 1})
    distributed_env["SDQ_LORA_DIR"] = str(folder)
    worker = start_worker("a")
    worker.wait_ready()
    (found,), _ = AdapterFinder([folder]).resolve("x <lora:detail:0.7>", "", "a1111")
    items = specs(3, steps=1)
    items[0]["loras"] = [found]
    items[1]["loras"] = [{**found, "sha256": "2" * 64}]  # the submitter's copy was another file
    result = submit(distributed, items, model=identify_model(tiny_checkpoint), batch_size=3)
    wait_until_done(distributed, result.job_id)
    made, refused, plain = job_items(open_database(distributed.database_url), result.job_id)
    assert (made.status, refused.status, plain.status) == (Status.DONE, Status.FAILED, Status.DONE)
    assert refused.last_error.startswith(f"lora detail: {folder / 'detail.safetensors'} has sha256 ")
    png = open_storage(distributed.storage_url).get(made.image_key)
    assert read_png_metadata(png).provenance.loras == (found,)
