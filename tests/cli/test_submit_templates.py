"""`sdq submit` with templates on the command line: refusals that record nothing (no image is
generated in these tests)."""
from __future__ import annotations

from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from sdq.db.models import Job

from .conftest import Home


def jobs(home: Home) -> int:
    with Session(home.engine) as session:
        return session.scalar(select(func.count()).select_from(Job)) or 0


def test_a_large_expansion_needs_yes(home: Home, tiny_checkpoint: Path) -> None:
    template = "a {" + "|".join(f"c{n}" for n in range(101)) + "} {x|y|z|w|v|u|t|s|r|q}"
    home.env["SDQ_CONFIRM_ITEMS"] = "1000"
    result = home.run("submit", "-p", template, "--model", str(tiny_checkpoint))
    assert result.exit_code == 2, result.output
    assert "1,010 images is more than 1,000 (SDQ_CONFIRM_ITEMS); check it with --dry-run" in \
        result.output and "--yes" in result.output
    dry = home.run("submit", "-p", template, "--model", str(tiny_checkpoint), "--grid",
                   "steps=1,2", "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert "1 row(s), 2,020 image(s)" in dry.output and "  a c0 x  steps=2" in dry.output
    assert "0 of 2,020 already generated" in dry.output
    assert jobs(home) == 0


def test_template_and_option_mistakes(home: Home, tiny_checkpoint: Path) -> None:
    model = ["--model", str(tiny_checkpoint)]
    bad = home.run("submit", "-p", "a {red|blue", *model)
    assert bad.exit_code == 2
    assert "--prompt:1: prompt: column 3: '{' is never closed" in bad.output
    grid = home.run("submit", "-p", "a fox", "--grid", "cfg=5,x", *model)
    assert grid.exit_code == 2 and "--grid 'cfg=5,x': expected a number, got 'x'" in grid.output
    prompts = home.path / "p.txt"
    prompts.write_text("a __animal__\n")
    both = home.run("submit", str(prompts), "-p", "a fox", *model)
    assert both.exit_code == 2 and "give a FILE or --prompt" in both.output
    wildcard = home.run("submit", str(prompts), *model)
    assert wildcard.exit_code == 2
    assert "p.txt:1: prompt: column 3: unknown wildcard __animal__: no wildcard folder" in wildcard.output
    assert jobs(home) == 0
