"""Benchmark LoRAs through the queue: a job alternating 4 LoRAs against the same job with none.

    python -m bench.bench_lora                   # 64 items, 4 euler steps, 64x64, 1 run each
    python -m bench.bench_lora --runs 3 --steps 10

A fresh embedded home gets the tiny random-weight model (the tests' architecture) and 4
kohya-ss LoRAs for it (rank 4, every UNet and text-encoder layer, as the model tests build
them). Each run submits one job through `jobs.submit.submit`, the whole embedded path
(recording, planning, the runner's claims, denoising, storing), with `reuse` off so nothing
comes from the result cache: item n uses LoRA n % 4 (or none, for the baseline), as recorded
by submit-time resolution (`jobs.adapters.AdapterFinder`). The runner groups each batch by
LoRA set and merges once per group, so the LoRA job pays a merge and a restore per group, not
per image. The table shows the best run's seconds per image, and the weight memory the
adapters hold after the job (originals of touched weights, and loaded files), which must not
grow with the number of LoRAs used: it is shown after jobs using 1, 2 and 4 of them (8 items
each), each on a fresh runner. The timed jobs share one runner (one loaded model), as a
worker's do. On a shared CPU the job times drift by more than the LoRAs cost, so the cost of
one switch of LoRA set (restore the base weights, merge the next set) is also timed on its own
(best of 5), and with the number of switches a job makes gives the expected cost per image.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from bench.timing import best_ms
from sdq.core.jobspec import DEFAULT_BATCH_SIZE
from sdq.core.settings import Settings
from sdq.db.models import Job
from sdq.jobs.adapters import AdapterFinder
from sdq.jobs.submit import identify_model, submit
from sdq.sdmodel.pipeline import load_pipeline
from sdq.sdmodel.tiny import build_tiny_networks, ldm_checkpoint
from sdq.worker.factory import runner_from_settings
from sdq.worker.runner import Runner
from tests.sdmodel.test_lora import kohya_file, random_updates

LORAS = ("detail", "style", "light", "ink")


def specs(count: int, loras: int, finder: AdapterFinder, steps: int) -> list[dict[str, Any]]:
    """`count` images, item n with LoRA n % `loras` (none when `loras` is 0)."""
    items = []
    for n in range(count):
        tag = f" <lora:{LORAS[n % loras]}:0.8>" if loras else ""
        prompt = f"a {('red', 'green', 'blue')[n % 3]} boat number {n}{tag}"
        found, _ = finder.resolve(prompt, "", "a1111")
        items.append({"prompt": prompt, "seed": 1000 + n, "sampler": "euler", "steps": steps,
                      "cfg": 7.5, "width": 64, "height": 64, "loras": found or None})
    return items


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=64)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sdq-bench-lora-") as folder:
        home = Path(folder)
        model_path = home / "tiny.safetensors"
        save_file(ldm_checkpoint(*build_tiny_networks()), str(model_path))
        pipe = load_pipeline(model_path, device="cpu", dtype="fp32")
        for seed, name in enumerate(LORAS, 1):
            kohya_file(home / f"{name}.safetensors", pipe,
                       random_updates(pipe, seed=seed, rank=4, strength=0.5), alpha=2.0,
                       spelling="diffusers")
        settings = Settings.load({"SDQ_HOME": str(home / "home"), "SDQ_DEVICE": "cpu",
                                  "SDQ_CONFIG": str(home / "none.toml"), "SDQ_LORA_DIR": str(home)})
        model = identify_model(model_path)
        finder = AdapterFinder(settings.lora_dir)
        runners: list[Runner] = []

        def make_runner(*given: Any) -> Runner:
            """One runner (one loaded model) for every job, as a worker process has."""
            if not runners:
                runners.append(runner_from_settings(*given))
            return runners[0]

        def job(loras: int, items: int = args.items) -> float:
            start = time.perf_counter()
            result = submit(settings, specs(items, loras, finder, args.steps), model=model,
                            job=Job(reuse=False), make_runner=make_runner)
            seconds = time.perf_counter() - start
            assert result.report is not None and result.report.done == items, result.report
            return seconds / items

        job(0)  # warm-up: first model load, kernels, the database file
        times: dict[int, list[float]] = {0: [], 4: []}
        for _ in range(args.runs):  # interleaved, so drift on a shared machine hits both
            for loras in times:
                times[loras].append(job(loras))
        adapters = runners[0].pipeline().adapters  # type: ignore[attr-defined]
        sets = [[(name, 0.8, None)] for name in LORAS[:2]]
        switch_ms = best_ms(lambda: [adapters.apply(s) for s in sets]) / len(sets)
        adapters.apply(())
        # The runner merges once per LoRA set in each batch it claims (the job's batch size).
        batches = -(-args.items // (settings.batch_size or DEFAULT_BATCH_SIZE))
        switches = batches * len(LORAS) + 1  # and back to the base weights for the next job
        memory = {}
        for loras in (1, 2, 4):
            runners.clear()  # a fresh worker: what this job alone leaves held
            job(loras, items=8)
            memory[loras] = runners[0].pipeline().adapters.memory_bytes()  # type: ignore[attr-defined]
        base, mixed = min(times[0]), min(times[4])
        print(f"{args.items} items per job, {args.steps} euler steps, 64x64, CPU fp32, "
              f"best of {args.runs}")
        print("| job | s/image | vs none |")
        print("|---|---|---|")
        print(f"| no LoRA | {base:.4f} | |")
        print(f"| 4 LoRAs alternating | {mixed:.4f} | {100 * (mixed / base - 1):+.1f} % |")
        expected = switches * switch_ms / 1000 / args.items
        print(f"| one switch of LoRA set, alone | {switch_ms / 1000:.4f} s x {switches} switches "
              f"= {expected:.4f} s/image | {100 * expected / base:+.1f} % |")
        print()
        print("| LoRAs used by the job | originals held (MB) | loaded files (MB) |")
        print("|---|---|---|")
        for loras, held in memory.items():
            print(f"| {loras} | {held['originals'] / 1e6:.1f} | {held['files'] / 1e6:.1f} |")


if __name__ == "__main__":
    main()
