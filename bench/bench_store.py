"""Claim: the store path (watermark, PNG encode, upload, record) keeps up with a GPU making
9 images/s at 512x512, given the PNG level and store threads sdq picks by default.

Two tables, on seeded photo-like 512x512 images (the stand-ins for decoded SD output that the
tests use: smooth colour fields plus fine grain of up to 10 levels; the PNG table also with
grain of 3, closer to SD's cleaner renders, which compress better):

1. PNG levels: per zlib level, the median CPU time (this thread's, so busy neighbours on a
   shared machine barely move it) to write one watermarked image as PNG with Pillow, the
   same for the whole `encode_png` (watermark + PNG + provenance chunks), and the mean file
   size.
2. Store path: images/s through `Runner.run` with a stand-in pipeline that hands back
   finished images at once, so that only the store path is timed: claim, then for every
   image watermark, encode, upload to a local folder (written and fsynced), record in SQLite
   (WAL); per store-thread count and PNG level. Chunks of --chunk images, as the GPU makes them.
   Each cell also gives the process's CPU time per image (all threads): on a shared machine
   the wall-clock rate depends on the neighbours, the CPU cost much less, and 9 x that cost
   is the number of free cores the store path needs at 9 images/s.

    python -m bench.bench_store [--images 48] [--threads 1,2,4] [--levels 0,1,3,6,9]
"""
from __future__ import annotations

import argparse
import io
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from PIL import Image
from sqlalchemy.orm import Session

from sdq.db.models import Item, Job, Model
from sdq.db.queries import submit_job
from sdq.db.session import open_database
from sdq.images import watermark as wm
from sdq.images.provenance import encode_png, environment_fingerprint
from sdq.images.storage import LocalStorage
from sdq.jobs.submit import plan_batches
from sdq.worker.runner import Runner
from tests.images.samples import photo, provenance

MARK = "StableDiffusionV1"
SHA256 = "0" * 64


class Replay:
    """Just enough of a Pipeline for the runner: "generates" by handing back ready images."""

    sha256, name, device, dtype = SHA256, "replay", "cpu", "float32"

    def __init__(self, images: list[Image.Image]) -> None:
        self.images = images

    def generate(self, requests: list[Any], **settings: Any) -> list[Image.Image]:
        return [self.images[n % len(self.images)] for n in range(len(requests))]


def png_levels(images: list[Image.Image], levels: list[int], grain: int) -> None:
    marked = [wm.embed(image, MARK) for image in images]
    print(f"{'grain':>5} {'level':>5} {'PNG CPU ms':>10} {'encode_png CPU ms':>17} {'KiB':>5}")
    for level in levels:
        png_ms, sizes = [], []
        for image in marked:
            buffer = io.BytesIO()
            start = time.thread_time()
            image.save(buffer, format="PNG", compress_level=level)
            png_ms.append((time.thread_time() - start) * 1000)
            sizes.append(len(buffer.getvalue()))
        whole_ms = []
        for image in images:
            start = time.thread_time()
            encode_png(image, provenance(), watermark=MARK, level=level)
            whole_ms.append((time.thread_time() - start) * 1000)
        print(f"{grain:>5} {level:>5} {statistics.median(png_ms):10.1f} "
              f"{statistics.median(whole_ms):17.1f} "
              f"{statistics.mean(sizes) / 1024:5.0f}")


def store_rate(images: list[Image.Image], count: int, chunk: int, threads: int, level: int,
               folder: Path) -> tuple[float, float]:
    """Images/s and CPU ms per image of `count` images through the runner's store path into
    a fresh SQLite file and image folder under `folder`."""
    engine = open_database(f"sqlite:///{folder / 'sdq.db'}")
    spec = {"prompt": "a red boat", "negative_prompt": "", "sampler": "ddim", "steps": 50,
            "cfg": 7.5, "width": 512, "height": 512}
    with Session(engine) as session:
        session.add(model := Model(sha256=SHA256, name="replay", architecture="sd-v1"))
        session.flush()
        job = submit_job(session, Job(), [{**spec, "seed": n, "model_id": model.id}
                                          for n in range(count)])
        session.commit()
        batches = plan_batches(session, Item.job_id == job.id, chunk, prefix="bench")[SHA256]
    runner = Runner(engine=engine, storage=LocalStorage(folder / "images"), model_ref="",
                    pipeline=Replay(images), watermark=MARK, micro_batch=chunk,  # type: ignore[arg-type]
                    png_level=level, store_threads=threads)
    start, cpu = time.perf_counter(), time.process_time()
    report = runner.run(batches)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    assert report.done == count, report
    engine.dispose()
    return count / elapsed, cpu / count * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=48, help="images per store-path run")
    parser.add_argument("--chunk", type=int, default=8, help="images per generated chunk")
    parser.add_argument("--threads", default="1,2,4")
    parser.add_argument("--levels", default="0,1,3,6,9")
    args = parser.parse_args()
    threads = [int(t) for t in args.threads.split(",")]
    levels = [int(level) for level in args.levels.split(",")]
    images = [photo(512, 512, seed) for seed in range(8)]
    print(f"{os.cpu_count()} cores; environment: {environment_fingerprint('cpu', 'float32')}")
    for grain in (10, 3):
        png_levels([photo(512, 512, seed, grain) for seed in range(8)], levels, grain)
    print(f"\nstore path: images/s / CPU ms per image ({args.images} images of 512x512, "
          f"chunks of {args.chunk}, watermark on, local folder + SQLite)")
    print(f"{'level':>5} " + " ".join(f"{f'{t} threads':>13}" for t in threads))
    for level in levels:
        cells = []
        for count in threads:
            with tempfile.TemporaryDirectory() as folder:
                rate, cpu_ms = store_rate(images, args.images, args.chunk, count, level, Path(folder))
            cells.append(f"{rate:5.1f} / {cpu_ms:5.0f}")
        print(f"{level:>5} " + " ".join(f"{cell:>13}" for cell in cells))


if __name__ == "__main__":
    main()
