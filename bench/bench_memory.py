"""Claim: a one-shot generation on the CPU peaks at no more resident memory than diffusers'.

Each side runs in a fresh process (peak RSS is per process, and a shared one would count the
other side's allocations): load the full-size random SD v1.5 checkpoint (fp16 file, run in
fp32 as `sdq generate` does on a CPU), generate one image, report `ru_maxrss`. The checkpoint
is bench_sdmodel's random one, written on first use (2.1 GB).

    python -m bench.bench_memory                      (512x512, 2 DDIM steps: minutes)
    python -m bench.bench_memory --width 256 --height 256
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository's `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._checkout import use_checkout  # noqa: E402

PROMPT = "a photograph of an astronaut riding a horse"


def peak_rss_gb() -> float:
    """This process's peak resident set; Linux reports kilobytes."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def run_side(side: str, path: Path, args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    settings = dict(width=args.width, height=args.height)
    if side == "sdq":
        from sdq.sdmodel.pipeline import Request, load_pipeline

        pipe = load_pipeline(path, device="cpu", dtype="fp32")
        loaded = peak_rss_gb()
        pipe.generate([Request(PROMPT, seed=1)], sampler="ddim", steps=args.steps, **settings)
    else:
        from bench.bench_sdmodel import diffusers_runner
        from sdq.sdmodel.pipeline import Request

        run = diffusers_runner(path, "full", argparse.Namespace(device="cpu", dtype="fp32", sampler="ddim",
                                                                 steps=args.steps, **settings))
        loaded = peak_rss_gb()
        run([Request(PROMPT, seed=1)])
    return {"side": side, "peak_rss_gb_after_load": round(loaded, 2), "peak_rss_gb": round(peak_rss_gb(), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model-dir", type=Path, default=Path("/tmp/sdq-bench"))
    parser.add_argument("--side", choices=["sdq", "diffusers"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    use_checkout()
    from bench.bench_sdmodel import model_file

    path = model_file("full", 0, args.model_dir)
    if args.side:
        print(json.dumps(run_side(args.side, path, args)))
        return
    rows = []
    for side in ("sdq", "diffusers"):
        out = subprocess.run([sys.executable, "-m", "bench.bench_memory", *sys.argv[1:], "--side", side],
                             check=True, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"full-size SD v1.5, CPU fp32, {args.width}x{args.height}, {args.steps} DDIM steps, 1 image\n")
    print("| side | peak RSS after loading (GB) | peak RSS (GB) |\n|---|---|---|")
    for r in rows:
        print(f"| {r['side']} | {r['peak_rss_gb_after_load']} | {r['peak_rss_gb']} |")


if __name__ == "__main__":
    main()
