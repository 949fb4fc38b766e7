"""Commands that do not generate start without torch, transformers or Celery. They run one
after the other in a fresh interpreter, as a user's shell would run them, which reports after
each what it had imported so far: the first command to load one is the one to blame."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from PIL import Image

from tests.adapters import write_embedding
from tests.cli.conftest import Home
from tests.conftest import stand_in_checkpoint

HEAVY = ["torch", "transformers", "celery"]
_RUN = """
import json, sys
from sdq.cli.main import cli
report = []
for args in json.loads(sys.argv[2]):
    try:
        cli.main(args, prog_name="sdq")
    except SystemExit as exit:
        code = exit.code
    loaded = sorted({name.split(".")[0] for name in sys.modules} & set(json.loads(sys.argv[3])))
    report.append({"args": args, "code": code, "loaded": loaded})
with open(sys.argv[1], "w") as out:
    json.dump(report, out)
"""


def test_commands_that_do_not_generate_load_no_model_stack_nor_celery(
        home: Home, tmp_path: Path) -> None:
    home.add_job(["a red fox", "a lighthouse"], done=2)
    assert home.run("get", "1", "-o", str(tmp_path / "one")).exit_code == 0
    prompts = tmp_path / "prompts.csv"
    prompts.write_text("prompt,n\na red fox,2\na lighthouse,1\n")
    model = stand_in_checkpoint(tmp_path / "sd15.safetensors")
    # Reading prompts takes a tokenizer: the embeddings a negative prompt names, the words a
    # long `plain` prompt loses.
    community = tmp_path / "community.csv"
    community.write_text("prompt,negative_prompt\n" + f'"{", ".join(["a red fox"] * 30)}",badneg\n')
    write_embedding(tmp_path / "embeddings", "badneg")
    (tmp_path / "photos").mkdir()
    Image.new("RGB", (64, 64)).save(tmp_path / "photos" / "a.png")
    commands = [
        ["submit", str(prompts), "--model", str(model), "--dry-run"],
        ["submit", str(community), "--model", str(model), "--dry-run",
         "--embeddings-dir", str(tmp_path / "embeddings")],
        ["submit", str(community), "--model", str(model), "--dry-run", "--prompt-syntax", "plain"],
        ["submit", str(prompts), "--init-dir", str(tmp_path / "photos"), "--model", str(model),
         "--dry-run"],
        ["models", "add", "sd15", str(model)], ["submit", str(prompts), "--model", "sd15", "--dry-run"],
        ["--help"], ["jobs"], ["search", "fox"], ["status", "1"], ["show", "1"], ["watch", "1"],
        ["config"], ["schedule", "list"], ["models", "list"], ["db", "current"],
        ["get", "2", "-o", str(tmp_path / "got")], ["verify", str(tmp_path / "one" / "1.png")],
        ["export", "1", "--format", "imagefolder", "-o", str(tmp_path / "export")],
        *([name, "--help"] for name in ("submit", "generate", "reproduce", "schedule", "scheduler",
                                        "worker", "workers", "retry", "resume", "models", "db")),
        ["purge", "1", "--yes"],
    ]
    report = tmp_path / "report.json"
    subprocess.run([sys.executable, "-c", _RUN, str(report), json.dumps(commands),
                    json.dumps(HEAVY)], env=home.env, capture_output=True, timeout=600, check=True)
    assert json.loads(report.read_text()) == [
        {"args": args, "code": 0, "loaded": []} for args in commands]


def test_the_shared_options_load_no_database_library() -> None:
    """`generate --help` and friends build their options from the core's vocabulary alone
    (ON_FLAG once came from the ORM models, a second of SQLAlchemy for a three-word tuple)."""
    code = ("import sys, sdq.cli.options; "
            "print(sorted(m for m in sys.modules if m.startswith('sqlalchemy')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
