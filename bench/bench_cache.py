"""Benchmark the result cache: resubmitting a job whose every image is stored already.

    python -m bench.bench_cache                  # 10 000 items, embedded (SQLite + a folder)
    python -m bench.bench_cache --items 1000

A fresh embedded home gets a tiny random-weight model (the tests' architecture) and one job
of --items images recorded as done: each with its own stored PNG and the cache key the runner
gives it on this machine (CPU, fp32), as if it had been generated. Then the same specs are
submitted again through `worker.jobs.submit.submit`, the whole embedded path: recording the
job, planning batches, loading the model, and the runner's claims, lookups and storage checks.
Every item is reused; the table shows the time of that submit and the `--dry-run` estimate.
Model loading is part of the time; with a full-size model it adds the load's seconds once.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from PIL import Image
from safetensors.torch import save_file
from sqlalchemy import update
from sqlalchemy.orm import Session

from sdq.db.models import Item, Job, Status
from sdq.db.queries import register_model, submit_job
from sdq.db.session import open_database
from sdq.core.params import GenerationParams, cache_key
from sdq.images.provenance import Provenance, encode_png, environment_fingerprint
from sdq.images.storage import image_key, open_storage
from sdq.jobs.submit import identify_model, stored_count, submit
from sdq.core.settings import Settings
from sdq.worker.factory import runner_from_settings
from tests.conftest import build_tiny_networks, ldm_checkpoint


def specs(count: int) -> list[dict]:
    return [{"prompt": f"a {('red', 'green', 'blue')[n % 3]} boat number {n // 3}",
             "seed": 1000 + n, "sampler": "euler", "steps": 20, "cfg": 7.5, "width": 64,
             "height": 64} for n in range(count)]


def store_as_made(settings: Settings, model_path: Path, items: list[dict]) -> None:
    """One done job of `items`, each with a stored PNG and the runner's cache key here."""
    model = identify_model(model_path)
    engine = open_database(settings.database_url)
    storage = open_storage(settings.storage_url)
    environment = environment_fingerprint("cpu", "fp32")
    with Session(engine) as session:
        model_id = register_model(session, sha256=model.sha256, name=model.name,
                                  source_uri=str(model_path)).id
        job = submit_job(session, Job(status=Status.DONE), [{**s, "model_id": model_id}
                                                            for s in items])
        rows = []
        ids = session.query(Item.id, Item.row_index).filter(Item.job_id == job.id)
        for item_id, row in ids:
            params = GenerationParams.of(items[row])
            png = encode_png(Image.new("RGB", (64, 64), (row % 256, 90, 30)), Provenance(
                params=params, model_sha256=model.sha256, model_name=model.name,
                environment=environment, job_id=job.id, item_id=item_id, row=row),
                watermark=settings.watermark)
            key = image_key(job.id, item_id)
            storage.put(key, png.data)
            rows.append({"id": item_id, "status": Status.DONE, "image_key": key,
                         "image_sha256": png.sha256, "cache_key": cache_key(
                             params, model_sha256=model.sha256, watermark=settings.watermark,
                             device="cpu", dtype="fp32")})
        session.execute(update(Item), rows)
        session.commit()
    engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=10_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sdq-bench-cache-") as folder:
        home = Path(folder)
        model_path = home / "tiny.safetensors"
        save_file(ldm_checkpoint(*build_tiny_networks()), str(model_path))
        settings = Settings.load({"SDQ_HOME": str(home / "home"), "SDQ_DEVICE": "cpu",
                                  "SDQ_CONFIG": str(home / "none.toml")})
        items = specs(args.items)
        start = time.perf_counter()
        store_as_made(settings, model_path, items)
        prepared = time.perf_counter() - start
        model = identify_model(model_path)
        engine = open_database(settings.database_url)
        with Session(engine) as session:
            start = time.perf_counter()
            estimate = stored_count(session, items, model, settings)
            dry_run = time.perf_counter() - start
        start = time.perf_counter()
        result = submit(settings, items, model=model, make_runner=runner_from_settings)
        resubmit = time.perf_counter() - start
        report = result.report
        assert report is not None and report.reused == report.done == args.items, report
        print(f"{args.items} items stored as made in {prepared:.1f} s (preparation, not timed)")
        print("| step | items | reused | seconds | items/s |")
        print("|---|---:|---:|---:|---:|")
        print(f"| dry-run estimate (`stored_count`) | {args.items} | {estimate} | "
              f"{dry_run:.2f} | {args.items / dry_run:,.0f} |")
        print(f"| resubmit, all cached (embedded) | {args.items} | {report.reused} | "
              f"{resubmit:.2f} | {args.items / resubmit:,.0f} |")


if __name__ == "__main__":
    main()
