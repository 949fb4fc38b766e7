"""The docs cannot drift from the code: every `console` block of README.md and docs/*.md that
shows what a command prints is run here, as a reader would type it, against the tiny model,
and its output compared with the block's (numbers that vary from run to run masked).

In a `console` block, a line `$ COMMAND` is a command and the lines under it are what it
prints (stdout and stderr, as a terminal shows them); a line `...` stands for any number of
lines. A command with nothing under it is an illustration and is not run. Each block runs
as one bash script in a folder of its own holding the files the blocks name (`FILES`), with
HOME at `/home/me` as the docs write it (so sdq's home is the default one under it), after
the block's own `SETUP` if it has one. Blocks this module cannot run yet
(they need a job history, a GPU, S3 or a second terminal) are listed in `NOT_RUN`, each with
its reason: the list can only shrink, since a listed block that no longer exists fails.

Version statements come from one place: constraints.txt.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
ELLIPSIS = "..."


@dataclass(frozen=True)
class Command:
    line: str
    shown: tuple[str, ...]
    """The lines the docs show under it."""


@dataclass(frozen=True)
class Block:
    doc: str
    line: int
    commands: tuple[Command, ...]

    @property
    def name(self) -> str:
        return f"{self.doc}:{self.line}"

    @property
    def first(self) -> str:
        return self.commands[0].line if self.commands else ""


def console_blocks() -> list[Block]:
    """Every ```console block of the docs that has a `$ ` command, with what each shows."""
    found = []
    for doc in DOCS:
        text = doc.read_text()
        for match in re.finditer(r"^```console\n(.*?)^```", text, re.M | re.S):
            commands: list[tuple[str, list[str]]] = []
            for line in match.group(1).splitlines():
                if line.startswith("$ "):
                    commands.append((line[2:], []))
                elif commands:
                    commands[-1][1].append(line)
            if commands:
                found.append(Block(doc.relative_to(ROOT).as_posix(),
                                   text[:match.start()].count("\n") + 1,
                                   tuple(Command(c, tuple(s)) for c, s in commands)))
    return found


NOT_RUN: dict[str, str] = {
    "sdq submit p.jsonl": "needs a file with a NUL and a 10 MiB prompt",
    "kill $(pgrep -f \"sdq submit\")     # in another terminal": "a second terminal",
    "sdq submit prompts.csv 2> log; cat log": "times and rates of a real run",
    "sdq submit prompts.csv --model ~/models/v1-5-pruned-emaonly.safetensors --steps 25":
        "a real model's run, then a broker",
    "sdq submit prompts.csv --safety-checker ~/models/stable-diffusion-v1-5 --on-flag black":
        "a safety checker that flags",
    "sdq submit animals.txt": "a template file other than datasets.md's animals.txt",
    "sdq submit animals.txt --wildcards wildcards --grid cfg=5,7.5 --seed 1000 --dry-run":
        "1,000 stored images to reuse",
    "sdq watch 8 && sdq gallery 8 -o job8/": "a job history",
    "sdq resume 7": "a job history",
    "sdq jobs": "a job history",
    "sdq status 2": "a job history",
    "sdq search red": "a job history",
    "sdq show 1": "a job history and a GPU",
    "sdq models add ~/models/v1-5-pruned-emaonly.safetensors --name sd15": "a job history",
    "sdq doctor": "a config naming an unreachable broker",
    "sdq reproduce 7": "a job history",
    "sdq purge 42": "a job history",
    "sdq export 42 --format webdataset --shard-size 500 -o s3://datasets/castles": "S3 and a job history",
    "sdq schedule add nightly --cron \"0 2 * * *\" prompts.csv --model sd-v1-5.safetensors -n 4 --tag nightly":
        "a schedule history",
}
"""Blocks not run yet, by their first command, with what running them would take."""

FILES = {
    "prompts.csv": "prompt,n,sampler,steps\na red dragon,4,euler_a,25\na lighthouse,4,euler_a,25\n"
                   "a castle,4,euler_a,25\n",
    "big.csv": "prompt\n" + "".join(f"a castle number {n}\n" for n in range(200)),
    "prompts.txt": "".join(f"a castle number {n}\n" for n in range(2000)),
    "rows.csv": "prompt,seed,sampler,width\na red fox,1,euler,512\n,x,eulr,500\n",
    "chain.txt": "__c1__\n",
    **{f"wildcards/c{k}.txt": "".join(f"{k}-{n} __c{k + 1}__\n" for n in range(60))
       for k in range(1, 7)},
    "wildcards/c7.txt": "".join(f"7-{n}\n" for n in range(60)),
    "wildcards/loop.txt": "__loop__\n",
    "wildcards/long.txt": "x" * 10_001 + "\n",
}
"""The files the run blocks name, by their path in the folder they run in."""

SETUP = {
    "sdq submit big.csv -n 200": "export SDQ_MODEL=~/models/v1-5-pruned-emaonly.safetensors",
    "sdq get --job 1 -o job1/": "printf 'a red fox\\na boat\\na lighthouse\\n' > three.txt && "
                                "sdq submit three.txt --model sd15.safetensors --steps 1 --width 64 "
                                "--height 64 >/dev/null 2>&1",
    "sdq sheet 1 -o job1.png": "sdq submit -p 'a red dragon' -n 16 --model sd15.safetensors "
                               "--steps 1 --width 64 --height 64 >/dev/null 2>&1",
    "sdq search fox": "mkdir -p ~/.config/sdq && echo \"max_attempts = 'x'\" > ~/.config/sdq/config.toml",
}
"""Shell lines run before a block (by its first command), unseen."""

MASKS = [
    (re.compile(r"base seed \d+"), "base seed <seed>"),
    (re.compile(r"\d{4}-\d\d-\d\d(?:[ T]\d\d:\d\d(?::\d\d)?(?:\+00:00)?)?"), "<time>"),
    (re.compile(r"\b[0-9a-f]{10,64}\b"), "<hash>"),
    (re.compile(r"\b\d+(?:\.\d+)?\s?(?:ms|s)\b"), "<duration>"),
]
"""What varies from run to run: times, hashes, random seeds, durations."""


def masked(lines: list[str] | tuple[str, ...]) -> list[str]:
    """Lines with what varies masked and runs of spaces folded (masking shifts columns)."""
    out = []
    for line in lines:
        for pattern, mask in MASKS:
            line = pattern.sub(mask, line)
        out.append(" ".join(line.split()))
    return out


def matches(shown: list[str], printed: list[str]) -> bool:
    """Whether `printed` is `shown`, a `...` line in `shown` standing for any lines."""
    if not shown:
        return not printed
    if shown[0] == ELLIPSIS:
        return any(matches(shown[1:], printed[n:]) for n in range(len(printed) + 1))
    return bool(printed) and shown[0] == printed[0] and matches(shown[1:], printed[1:])


@pytest.fixture
def folder(tmp_path: Path, tiny_checkpoint: Path) -> Path:
    """The reader's folder: the files the blocks name, and the tiny model under the names the
    blocks give models."""
    for name, text in FILES.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    for name in ("sd15.safetensors", "home/me/models/v1-5-pruned-emaonly.safetensors"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        os.link(tiny_checkpoint, tmp_path / name)
    return tmp_path


def run_block(block: Block, folder: Path) -> list[list[str]]:
    """Run the block's commands that show output, in one bash script; what each printed."""
    env = {name: value for name, value in os.environ.items()
           if not name.startswith(("SDQ_", "XDG_"))}
    env.update({"HOME": str(folder / "home/me"), "SDQ_DEVICE": "cpu",
                "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"})
    script = [SETUP.get(block.first, ""), "status=0"]
    for command in block.commands:
        if command.shown:  # `$?` is the status of the command before, as in a terminal
            script += ["echo '@@@'", "(exit $status)", f"{command.line} 2>&1", "status=$?"]
    done = subprocess.run(["bash", "-c", "\n".join(script)], cwd=folder, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=600)
    printed = done.stdout.replace(str(folder), "")
    return [part.splitlines() for part in printed.split("@@@\n")[1:]]


BLOCKS = console_blocks()


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.first not in NOT_RUN],
                         ids=lambda b: b.name)
def test_a_console_block_prints_what_it_shows(block: Block, folder: Path) -> None:
    shown = [command for command in block.commands if command.shown]
    for command, printed in zip(shown, run_block(block, folder), strict=True):
        assert matches(masked(command.shown), masked(printed)), (
            f"{block.name}: `{command.line}` printed:\n" + "\n".join(printed))


def test_every_block_not_run_is_still_in_the_docs() -> None:
    assert set(NOT_RUN) <= {block.first for block in BLOCKS}, set(NOT_RUN) - {b.first for b in BLOCKS}


def test_the_masks_hide_only_what_varies() -> None:
    assert masked(["Job 7: 12 image(s) in 2 batch(es), 2025-06-01 12:04, base seed 27366, 1.5s"]) \
        == ["Job 7: 12 image(s) in 2 batch(es), <time>, base seed <seed>, <duration>"]
    assert matches(["a", ELLIPSIS, "d"], ["a", "b", "c", "d"]) and not matches(["a"], ["a", "b"])


def test_transformers_versions_come_from_constraints() -> None:
    """README, docs and the packaging name the transformers release constraints.txt pins, or
    none: the README's install, .ci/run and the Dockerfile install with that file.
    (docs/benchmarks.md names the packages of the machine each number was measured on.)"""
    [pin] = [Requirement(line) for line in (ROOT / "constraints.txt").read_text().splitlines()
             if line.startswith("transformers")]
    [version] = [spec.version for spec in pin.specifier if spec.operator == "=="]
    for path in [*(d for d in DOCS if d.name != "benchmarks.md"), ROOT / "pyproject.toml",
                 ROOT / "Dockerfile"]:
        for stated in re.findall(r"transformers\W{1,4}(\d+\.\d+\.\d+)", path.read_text()):
            assert stated == version, f"{path.name} names transformers {stated}, constraints.txt {version}"
    assert "transformers==" not in (ROOT / "pyproject.toml").read_text()
