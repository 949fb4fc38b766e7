"""Claim: `sdq --help` starts in under 0.3 s and `sdq jobs` / `sdq search WORD` in under
0.5 s on a quiet machine, because commands import only what they use (no torch,
transformers or Celery for commands that do not generate: `generate --help` and the plan of
`submit --dry-run` included).

Prints the median and best wall time over N runs of each command, each in a fresh process
as a shell runs it, next to `python -c pass` (the interpreter's own start) and the imports of
click and SQLAlchemy's ORM alone (the floor of any command that reads the database), under a scratch
SDQ_HOME whose embedded database exists (a first run creates it, and is not timed). The
median CPU time (user + system) is printed too: on a busy machine the wall time mostly
measures the wait for a core, the CPU time what a quiet machine's wall time would be.

    python -m bench.bench_startup [--runs 15] [--python PATH]    (from the repository root)

`--python` times another checkout's interpreter (e.g. one from before a change) on the same
commands.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COMMANDS = (["--help"], ["jobs"], ["search", "lighthouse"], ["config"], ["schedule", "list"],
            ["generate", "--help"], ["submit", "{prompts}", "--model", "{model}", "--dry-run"])
"""`{prompts}` and `{model}` are a 3-row prompt file and a stand-in model in the scratch home:
a plan checks and hashes the model, and loads nothing of it."""
_STAND_IN = ("model.diffusion_model.w", "first_stage_model.w", "cond_stage_model.transformer.w")
FLOORS = ("pass", "import click", "import sqlalchemy.orm")
"""What no sdq command can start faster than: the interpreter, and the libraries commands that
print or read the database cannot do without."""
_SDQ = "import sys; from sdq.cli.main import cli; sys.argv[0] = 'sdq'; cli()"


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(argv: list[str], env: dict[str, str], runs: int) -> tuple[list[float], list[float]]:
    """Wall and CPU seconds of each run of `argv`."""
    walls, cpus = [], []
    for _ in range(runs):
        cpu, start = _cpu(), time.perf_counter()
        done = subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True)
        if done.returncode:
            raise SystemExit(f"{' '.join(argv[3:])} failed: {done.stderr.strip()[-300:]}")
        walls.append(time.perf_counter() - start)
        cpus.append(_cpu() - cpu)
    return walls, cpus


def stand_in_model(path: Path) -> Path:
    """A file that passes sdq's model check (a safetensors header naming the three networks'
    weights) and holds one float per network: what a plan hashes, written without torch."""
    header = json.dumps({name: {"dtype": "F32", "shape": [1], "data_offsets": [4 * i, 4 * i + 4]}
                         for i, name in enumerate(_STAND_IN)}).encode()
    path.write_bytes(len(header).to_bytes(8, "little") + header + bytes(4 * len(_STAND_IN)))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--python", default=sys.executable,
                        help="The interpreter whose sdq is timed [default: this one].")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as home:
        env = {**os.environ, "SDQ_HOME": home, "SDQ_CONFIG": str(Path(home) / "none.toml")}
        env.pop("SDQ_DATABASE_URL", None)
        env.pop("SDQ_BROKER_URL", None)
        subprocess.run([args.python, "-c", _SDQ, "jobs"], env=env, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        files = {"model": str(stand_in_model(Path(home) / "sd15.safetensors")),
                 "prompts": str(Path(home) / "prompts.csv")}
        Path(files["prompts"]).write_text("prompt\na red fox\na lighthouse\na boat\n")
        rows = [(f"python -c {code!r}", timed([args.python, "-c", code], env, args.runs))
                for code in FLOORS]
        rows += [(f"sdq {' '.join(command)}".format(prompts="FILE", model="MODEL"),
                  timed([args.python, "-c", _SDQ, *(a.format(**files) for a in command)], env,
                        args.runs))
                 for command in COMMANDS]
    load = os.getloadavg()[0]
    print(f"{args.runs} runs each, load average {load:.1f}, {os.cpu_count()} CPUs")
    print(f"{'command':<40} {'wall median s':>13} {'wall best s':>11} {'CPU median s':>12}")
    for label, (walls, cpus) in rows:
        print(f"{label:<40} {statistics.median(walls):>13.3f} {min(walls):>11.3f} "
              f"{statistics.median(cpus):>12.3f}")


if __name__ == "__main__":
    main()
