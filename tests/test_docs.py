"""The docs cannot drift from the code: every `console` block of README.md and docs/*.md that
shows what a command prints is run here, as a reader would type it, against the tiny model,
and its output compared with the block's (numbers that vary from run to run masked).

In a `console` block, a line `$ COMMAND` is a command and the lines under it are what it
prints (stdout and stderr, as a terminal shows them); a line `...` stands for any number of
lines. A command with nothing under it is an illustration and is not run. Each block runs
as one bash script in a folder of its own holding the files the blocks name (`FILES`), with
HOME at `/home/me` as the docs write it (so sdq's home is the default one under it), after
the block's own `SETUP` if it has one. A block in `ON_HISTORY` starts from a copy of one job
history (`HISTORY`, made once per session: job 1, `castles.csv`, three images), so its job
and item numbers are the ones that history has; a block in `ON_S3` writes to a bucket on the
tests' S3 endpoint. Every block that shows output is run: a block whose output needs what no
test machine has (a GPU, a real model's timings, a second terminal, a safety checker that
flags) shows the command alone, in a `sh` block, and says in prose what it prints. A block
named in `ON_HISTORY`, `ON_S3` or `SETUP` that no longer exists fails, so none is left over.

Version statements come from one place: constraints.txt.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from tests.s3server import S3Server

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
        """Its first command without a trailing `# comment`: what `SETUP` and `ON_*` name."""
        return re.sub(r"\s+#[^'\"]*$", "", self.commands[0].line) if self.commands else ""


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


FILES = {
    "prompts.csv": "prompt,n,sampler,steps\na red dragon,4,euler_a,25\na lighthouse,4,euler_a,25\n"
                   "a castle,4,euler_a,25\n",
    "big.csv": "prompt\n" + "".join(f"a castle number {n}\n" for n in range(200)),
    "prompts.txt": "".join(f"a castle number {n}\n" for n in range(2000)),
    "rows.csv": "prompt,seed,sampler,width\na red fox,1,euler,512\n,x,eulr,500\n",
    "animals.csv": "prompt,negative_prompt\na photo of a {fox|owl},__blur__\na photo of {a fox,\n"
                   "a photo of an owl,__blurr__\n",
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
    "sdq submit p.jsonl": "python -c 'import json; print(*(json.dumps({\"prompt\": p}) for p in "
                          "(\"a fox\", \"a\\0b\", \"x\" * 10 * 2**20)), sep=\"\\n\")' > p.jsonl",
    "cat animals.csv": "printf 'blurry\\n' > wildcards/blur.txt",
    "sdq submit animals.txt --wildcards wildcards --grid cfg=5,7.5 --seed 1000 --dry-run":
        "printf 'fox\\nowl\\nheron\\n' > wildcards/animal.txt && "
        "printf 'in the snow\\nat dusk\\n' > wildcards/place.txt && "
        "printf 'a {2::photo|painting} of a __animal__ __place__\\n' > animals.txt && "
        "export SDQ_MODEL=~/models/v1-5-pruned-emaonly.safetensors",
    "sdq resume 2": "sdq submit -p 'a castle at dusk' -n 6 --batch-size 1 --steps 1 --width 64 "
                    "--height 64 --model ~/models/v1-5-pruned-emaonly.safetensors >/dev/null 2>&1 & "
                    "for n in $(seq 3000); do compgen -G ~/'.local/share/sdq/images/2/*.png' >/dev/null "
                    "&& break; sleep 0.1; done; kill -TERM $!; wait",  # stopped after an image
    "ls -1 photos": "mkdir -p photos && printf 'where they were taken\\n' > photos/README.txt && "
                 "python -c \"from PIL import Image; [Image.new('RGB', (640, 480), (40 * n, 90, 30))"
                 ".save(f'photos/{name}.jpg') for n, name in enumerate(('beach', 'harbour', "
                 "'market'))]\" && printf 'prompt,n\\na watercolour painting,2\\nan oil painting "
                 "at dusk,1\\n' > variations.csv && "
                 "export SDQ_MODEL=~/models/v1-5-pruned-emaonly.safetensors",
    "SDQ_BROKER_URL=redis://:secret@127.0.0.1:6390/0 sdq doctor":
        "export SDQ_MODEL=~/models/v1-5-pruned-emaonly.safetensors",
}
"""Shell lines run before a block (by its first command), unseen."""

MASKS = [
    (re.compile(r"base seed \d+"), "base seed <seed>"),
    (re.compile(r"\d{4}-\d\d-\d\d(?:[ T]\d\d:\d\d(?::\d\d)?(?:\+00:00)?)?"), "<time>"),
    (re.compile(r"\b[0-9a-f]{10,64}\b"), "<hash>"),
    (re.compile(r"\b(j\d+)-[0-9a-f]{6}-"), r"\1-<hash>-"),  # a batch: job, model hash, number
    (re.compile(r"\b\d+(?:\.\d+)?\s?(?:ms|s)\b"), "<duration>"),
]
"""What varies from run to run (times, hashes, random seeds, durations) or from the model the
docs name to the tiny one (its hashes)."""


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


HISTORY = ("printf 'prompt\\na red dragon over the sea\\na red fox in the snow\\na lighthouse\\n' "
           "> castles.csv && sdq submit castles.csv --model ~/models/v1-5-pruned-emaonly.safetensors "
           "--seed 100 --sampler euler --steps 1 --width 64 --height 64")
"""The job history the `ON_HISTORY` blocks start from: job 1, items 1-3 (seeds 100-102)."""

ON_HISTORY = {"sdq jobs", "sdq status 1", "sdq search red", "sdq show 1",
              "sdq models add ~/models/v1-5-pruned-emaonly.safetensors --name sd15",
              "sdq reproduce 1", "sdq purge 1 --yes --json", "sdq resume 2",
              "sdq verify 1",
              "sdq export 1 --format webdataset --shard-size 2 -o s3://datasets/castles",
              "sdq watch 1 && sdq gallery 1 -o job1/"}
"""The blocks that start from `HISTORY`, by their first command."""

ON_S3 = {"sdq export 1 --format webdataset --shard-size 2 -o s3://datasets/castles"}
"""The blocks that write to `s3://datasets`: a bucket on the tests' S3 endpoint (moto)."""


def reader_env(folder: Path) -> dict[str, str]:
    """The environment of a reader in `folder`: HOME at its `home/me`, no sdq settings."""
    env = {name: value for name, value in os.environ.items()
           if not name.startswith(("SDQ_", "XDG_"))}
    env.update({"HOME": str(folder / "home/me"), "SDQ_DEVICE": "cpu",
                "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"})
    return env


def reader_folder(folder: Path, tiny_checkpoint: Path) -> Path:
    """The reader's folder: the files the blocks name, and the tiny model under the names the
    blocks give models."""
    for name, text in FILES.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    for name in ("sd15.safetensors", "sd-v1-5.safetensors",
                 "home/me/models/v1-5-pruned-emaonly.safetensors"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        os.link(tiny_checkpoint, folder / name)
    return folder


@pytest.fixture(scope="session")
def history(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> Path:
    """A reader's folder after `HISTORY`, made once: the blocks on it start from a copy."""
    folder = reader_folder(tmp_path_factory.mktemp("history"), tiny_checkpoint)
    subprocess.run(["bash", "-c", HISTORY], cwd=folder, env=reader_env(folder), check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600)
    return folder


@pytest.fixture
def folder(tmp_path: Path, tiny_checkpoint: Path) -> Path:
    """A fresh reader's folder."""
    return reader_folder(tmp_path, tiny_checkpoint)


def run_block(block: Block, folder: Path, history: Path | None = None,
              env: dict[str, str] | None = None) -> list[list[str]]:
    """Run the block's commands that show output, in one bash script (in a copy of `history`
    when given, with `env` added); what each printed, with the folders' paths cut out as a
    reader's `/home/me`."""
    if history is not None:
        shutil.copytree(history / "home/me", folder / "home/me", dirs_exist_ok=True,
                        ignore=lambda at, names: ["models"] if at == str(history / "home/me") else [])
        shutil.copy(history / "castles.csv", folder)
    script = [SETUP.get(block.first, ""), "status=0"]
    for command in block.commands:
        if command.shown:  # `$?` is the status of the command before, as in a terminal
            script += ["echo '@@@'", "(exit $status)", f"{command.line} 2>&1", "status=$?"]
    done = subprocess.run(["bash", "-c", "\n".join(script)], cwd=folder,
                          env={**reader_env(folder), **(env or {})},
                          text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=600)
    printed = done.stdout.replace(str(folder), "")
    if history is not None:
        printed = printed.replace(str(history), "")
    return [part.splitlines() for part in printed.split("@@@\n")[1:]]


def s3_env(server: S3Server) -> dict[str, str]:
    """The AWS variables of a reader whose `s3://datasets` bucket is on `server`."""
    client = server.client()
    if "datasets" not in [b["Name"] for b in client.list_buckets().get("Buckets", [])]:
        client.create_bucket(Bucket="datasets")
    return {"AWS_ENDPOINT_URL": server.endpoint, "AWS_ACCESS_KEY_ID": server.access_key,
            "AWS_SECRET_ACCESS_KEY": server.secret_key, "AWS_DEFAULT_REGION": "us-east-1"}


BLOCKS = console_blocks()


@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: b.name)
def test_a_console_block_prints_what_it_shows(block: Block, folder: Path,
                                              request: pytest.FixtureRequest) -> None:
    history = request.getfixturevalue("history") if block.first in ON_HISTORY else None
    env = s3_env(request.getfixturevalue("s3_server")) if block.first in ON_S3 else {}
    shown = [command for command in block.commands if command.shown]
    for command, printed in zip(shown, run_block(block, folder, history, env), strict=True):
        assert matches(masked(command.shown), masked(printed)), (
            f"{block.name}: `{command.line}` printed:\n" + "\n".join(printed))


def test_every_block_named_here_is_still_in_the_docs() -> None:
    named = ON_HISTORY | ON_S3 | set(SETUP)
    assert named <= {block.first for block in BLOCKS}, named - {b.first for b in BLOCKS}


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
