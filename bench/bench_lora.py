"""Benchmark LoRAs through the queue: a job alternating 4 LoRAs against the same job with none.

    python -m bench.bench_lora                   # 64 items, 4 euler steps, 64x64, 5 pairs
    python -m bench.bench_lora --pairs 7 --steps 25
    python -m bench.bench_lora --threads 1       # steadier on a machine others are using

A fresh embedded home gets the tiny random-weight model (the tests' architecture) and 4
kohya-ss LoRAs for it (rank 4, every UNet and text-encoder layer, as the model tests build
them). Each job is submitted through `jobs.submit.submit`, the whole embedded path (recording,
planning, the runner's claims, denoising, storing), with `reuse` off so nothing comes from the
result cache: item n uses LoRA n % 4 (or none, for the baseline), as recorded by submit-time
resolution (`jobs.adapters.AdapterFinder`). Submit plans each set's items together and the
runner groups each batch by LoRA set, merging once per group, so the LoRA job pays a switch
of set per set and batch, not per image; its time includes going back to the base weights
after it, so the baseline never pays a switch.

On a shared CPU the job times drift by more than the LoRAs cost, so the jobs run in pairs, a
baseline and a LoRA job back to back (in alternating order), and the figure is the median of
the pairs' differences per image: drift slower than a pair cancels out. The tiny model's
operations are short, so its threads wait on each other at every one: where other processes
hold the cores, one thread (`--threads 1`) is far steadier than two. The cost of one switch
of LoRA set is also timed on its own: merging the next set and the first UNet call after it
(that call lays the merged convolution weights out for oneDNN again) less a second call, each
the fastest of 5 rounds. With the switches the job made (counted), it gives the cost per image
the switches alone explain.

Last, the weight memory the adapters hold after a job (originals of touched weights, and
loaded files), which must not grow with the number of LoRAs used: after jobs using 1, 2 and 4
of them (8 items each), each on a fresh runner. The timed jobs share one runner (one loaded
model), as a worker's do.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from sdq.core.settings import Settings
from sdq.db.models import Job
from sdq.jobs.adapters import AdapterFinder
from sdq.jobs.submit import identify_model, submit
from sdq.sdmodel.fastpath import CPU_BATCH_SIZE
from sdq.sdmodel.lora import Adapters
from sdq.sdmodel.pipeline import Pipeline, load_pipeline
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


def count_switches(adapters: Adapters) -> list[int]:
    """A one-element counter of the set switches `adapters` makes from now on."""
    switches = [0]
    merge = adapters.apply

    def counted(loras: Any) -> None:
        before = adapters.current
        merge(loras)
        switches[0] += adapters.current != before

    adapters.apply = counted  # type: ignore[method-assign]
    return switches


@torch.inference_mode()
def switch_ms(pipe: Pipeline, rounds: int = 5) -> float:
    """One switch of LoRA set: the merge and the first UNet call after it (a CPU batch with
    guidance at 64x64), less a second call; each the fastest of `rounds` rounds through the 4
    LoRAs (the figure least disturbed by the machine's other work)."""
    unet = pipe.unet
    x = torch.randn(2 * CPU_BATCH_SIZE, 4, 8, 8)
    t = torch.full((2 * CPU_BATCH_SIZE,), 500.0)
    context = torch.randn(2 * CPU_BATCH_SIZE, 77, pipe.text_encoder.config.hidden_size)

    def seconds(run: Callable[[], object]) -> float:
        start = time.perf_counter()
        run()
        return time.perf_counter() - start

    switched, steady = [], []
    for round_ in range(rounds + 1):  # the first round loads the files and copies the originals
        for name in LORAS:
            merged = seconds(lambda: (pipe.adapters.apply([(name, 0.8, None)]), unet(x, t, context)))
            again = seconds(lambda: unet(x, t, context))
            if round_:
                switched.append(merged)
                steady.append(again)
    pipe.adapters.apply(())
    return (min(switched) - min(steady)) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=64)
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=0,
                        help="torch's CPU threads (0: its default, one per core)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
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

        def adapters() -> Adapters:
            return runners[0].pipeline().adapters  # type: ignore[attr-defined]

        def job(loras: int, items: int = args.items) -> float:
            """Seconds per image of one job; a LoRA job's include going back to the base weights."""
            start = time.perf_counter()
            result = submit(settings, specs(items, loras, finder, args.steps), model=model,
                            job=Job(reuse=False), make_runner=make_runner)
            adapters().apply(())
            seconds = time.perf_counter() - start
            assert result.report is not None and result.report.done == items, result.report
            return seconds / items

        job(0), job(4)  # warm-up: first model load, kernels, the database file, LoRA files
        switches = count_switches(adapters())
        times: dict[int, list[float]] = {0: [], 4: []}
        load = os.getloadavg()[0]
        for pair in range(args.pairs):
            for loras in (0, 4) if pair % 2 == 0 else (4, 0):
                times[loras].append(job(loras))
        load = max(load, os.getloadavg()[0])
        per_job = switches[0] / args.pairs
        switch = switch_ms(runners[0].pipeline())  # type: ignore[arg-type]
        memory = {}
        for loras in (1, 2, 4):
            runners.clear()  # a fresh worker: what this job alone leaves held
            job(loras, items=8)
            memory[loras] = adapters().memory_bytes()
        base = statistics.median(times[0])
        differences = sorted(100 * (mixed / plain - 1) for plain, mixed in zip(times[0], times[4]))
        print(f"{args.items} items per job, {args.steps} euler steps, 64x64, CPU fp32 on "
              f"{torch.get_num_threads()} threads, {args.pairs} pairs; 1-minute load average "
              f"up to {load:.1f} on {os.cpu_count()} CPUs")
        print("| job | s/image (median) | vs none |")
        print("|---|---:|---:|")
        print(f"| no LoRA | {base:.4f} | |")
        print(f"| 4 LoRAs alternating | {statistics.median(times[4]):.4f} | "
              f"{statistics.median(differences):+.1f} % (pairs: {differences[0]:+.1f} .. "
              f"{differences[-1]:+.1f} %) |")
        expected = per_job * switch / 1000 / args.items
        print(f"| one switch of LoRA set, alone: {switch:.1f} ms x {per_job:g} switches per job | "
              f"{expected:.4f} | {100 * expected / base:+.1f} % |")
        print()
        print("| LoRAs used by the job | originals held (MB) | loaded files (MB) |")
        print("|---|---:|---:|")
        for loras, held in memory.items():
            print(f"| {loras} | {held['originals'] / 1e6:.1f} | {held['files'] / 1e6:.1f} |")


if __name__ == "__main__":
    main()
