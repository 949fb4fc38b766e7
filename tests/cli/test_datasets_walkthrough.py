"""docs/datasets.md, run: its shell blocks in order (real `sdq` processes, on the tiny model),
compared with what its console blocks show, then its Python block, which loads the exported
dataset."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_docs import masked, matches

WALKTHROUGH = Path(__file__).parents[2] / "docs" / "datasets.md"
SMALL = " --steps 1 --width 64 --height 64 --sampler euler"
GENERATING = ("sdq submit ", "sdq schedule add ")


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", WALKTHROUGH.read_text(), re.DOTALL)


def test_the_walkthrough_runs(tmp_path: Path, tiny_checkpoint: Path,
                              monkeypatch: pytest.MonkeyPatch) -> None:
    env = {name: value for name, value in os.environ.items() if not name.startswith("SDQ_")}
    env.update({"SDQ_HOME": str(tmp_path / "home"), "SDQ_CONFIG": str(tmp_path / "none.toml"),
                "SDQ_MODEL": str(tiny_checkpoint), "SDQ_DEVICE": "cpu",
                "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"})
    # One shell for all blocks, as a reader's terminal: what one block exports, the next sees.
    script = []
    for number, block in enumerate(blocks("sh")):
        script.append(f"echo '@@@ block {number}'")
        script += [line + SMALL if line.startswith(GENERATING) and "--dry-run" not in line
                   else line for line in block.splitlines()]
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", "\n".join(script)], cwd=tmp_path,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout
    outputs = re.split(r"@@@ block \d+\n", done.stdout)[1:]
    dry_run, first, again = outputs[1], outputs[2], outputs[3]
    # What the console blocks show (stdout and stderr, as a terminal shows them: tests/test_docs.py);
    # those with `$ ` commands of their own (section 7's) are tests/test_docs.py's to run.
    shown_outputs = [block for block in blocks("console") if not block.startswith("$ ")]
    for printed, shown in zip((dry_run, again), shown_outputs, strict=True):
        assert matches(masked(shown.splitlines()), masked(printed.splitlines())), printed
    assert "24 image(s)" in dry_run and "a photo of a fox in the snow  cfg=7.5" in dry_run
    assert "0 of 24 already generated" in dry_run and "nothing recorded" in dry_run
    assert "24/24 done" in first and "reused" not in first
    assert "Job 2: 24/24 done (24 reused from stored images, no model call)" in again
    assert "24 image(s) in 1 shard(s)" in outputs[5]
    card = (tmp_path / "animals-dataset" / "README.md").read_text()
    assert "Seed policy `add`" in card and "__animal__" in card

    monkeypatch.chdir(tmp_path)
    [python] = blocks("python")
    namespace: dict[str, object] = {}
    exec(compile(python, str(WALKTHROUGH), "exec"), namespace)
    dataset = namespace["dataset"]
    assert dataset.num_rows == 24  # type: ignore[attr-defined]
    assert {row["template"] for row in dataset} == {  # type: ignore[attr-defined]
        "a {2::photo|painting} of a __animal__ __place__"}
