"""docs/prompts.md's civitai example, run: its prompt file and shell block as written (real
`sdq` processes, on the tiny model, with a tiny LoRA and embedding under the names it uses),
then the recorded rows and the infotext read back from the stored PNG."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from sdq.db.models import Item
from sdq.db.session import open_database
from sdq.images.provenance import parse_parameters, read_png_metadata
from sdq.images.storage import open_storage
from tests.adapters import sha256, write_embedding, write_loras

DOC = Path(__file__).parents[2] / "docs" / "prompts.md"
SMALL = " --width 64 --height 64 --steps 2"
"""The tiny model at a tiny size; the example's own sampler and steps are kept but for this."""


def example() -> tuple[str, str]:
    """The section's CSV block and shell block."""
    section = DOC.read_text().split("## A civitai prompt file through `sdq submit`")[1]
    [csv] = re.findall(r"```csv\n(.*?)```", section, re.DOTALL)
    [shell] = re.findall(r"```sh\n(.*?)```", section, re.DOTALL)
    return csv, shell


def test_the_civitai_example_runs_and_reads_back(tmp_path: Path, tiny_checkpoint: Path) -> None:
    csv, shell = example()
    (tmp_path / "civitai.csv").write_text(csv)
    lora = write_loras(tmp_path / "loras", tiny_checkpoint, {"add_detail": 4})["add_detail"]
    embedding = write_embedding(tmp_path / "embeddings", "EasyNegative", seed=5)
    env = {name: value for name, value in os.environ.items() if not name.startswith("SDQ_")}
    env.update({"SDQ_HOME": str(tmp_path / "home"), "SDQ_CONFIG": str(tmp_path / "none.toml"),
                "SDQ_MODEL": str(tiny_checkpoint), "SDQ_DEVICE": "cpu",
                "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"})
    script = [line.replace("--steps 25", "") + SMALL if line.startswith("sdq submit ") else line
              for line in shell.splitlines()]
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", "\n".join(script)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    found = json.loads(done.stdout[done.stdout.index("["):])
    assert len(found) == 1 and found[0]["status"] == "done"

    engine = open_database(f"sqlite:///{tmp_path / 'home' / 'sdq.db'}")
    with Session(engine) as session:
        item = session.scalars(select(Item)).one()
    engine.dispose()
    assert (item.prompt_syntax, item.clip_skip, item.sampler) == ("a1111", 2, "dpmpp_2m_karras")
    assert [(r["name"], r["weight"], r["sha256"]) for r in item.loras] == [
        ("add_detail", 0.8, sha256(lora))]
    assert item.embeddings == [{"name": "EasyNegative", "sha256": sha256(embedding)}]

    png = open_storage(str(tmp_path / "home" / "images")).get(item.image_key)
    meta = read_png_metadata(png)
    parameters = parse_parameters(meta.parameters_text)
    assert parameters.prompt == item.prompt and "<lora:add_detail:0.8>" in parameters.prompt
    assert parameters.negative_prompt == "EasyNegative, (lowres:1.2), watermark"
    assert parameters.settings["Clip skip"] == "2"
    assert parameters.settings["Lora hashes"] == f"add_detail: {item.loras[0]['a1111']}"
    assert parameters.settings["TI hashes"] == f"EasyNegative: {sha256(embedding)[:12]}"
    assert "Emphasis" not in parameters.settings
    assert meta.provenance.loras == tuple(item.loras)
    verified = subprocess.run(["sdq", "verify", str(item.id)], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)
    assert verified.returncode == 0, verified.stdout + verified.stderr
