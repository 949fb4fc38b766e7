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


def test_a_chain_of_wildcard_files_is_refused_at_once(home: Home, tiny_checkpoint: Path) -> None:
    """Seven 60-line files, each line naming the next: 60^7 prompts, counted, not made."""
    folder = home.path / "wildcards"
    folder.mkdir()
    for k in range(7):
        after = f" __w{k + 1}__" if k < 6 else ""
        (folder / f"w{k}.txt").write_text("".join(f"w{k}-{i}{after}\n" for i in range(60)))
    prompts = home.path / "p.txt"
    prompts.write_text("a fox\na __w0__ at dusk\n")
    result = home.run("submit", str(prompts), "--wildcards", str(folder), "--dry-run",
                      "--model", str(tiny_checkpoint))
    assert result.exit_code == 2, result.output
    assert result.stderr.splitlines()[0] == (
        f"{prompts}:2: prompt: expands to 2,799,360,000,000 prompts, more than 1,000,000")


def test_templates_past_the_limits_are_file_line_problems(home: Home, tiny_checkpoint: Path) -> None:
    model = ["--model", str(tiny_checkpoint)]
    nested = home.run("submit", "-p", "{" * 600 + "x" + "}" * 600, "--dry-run", *model)
    assert nested.exit_code == 2, nested.output
    assert nested.stderr.splitlines()[0] == "--prompt:1: prompt: column 21: '{' nested more than 20 deep"
    (home.path / "long.txt").write_text("a" * 10_001 + "\n")
    long = home.run("submit", "-p", "__long__", "--wildcards", str(home.path), "--dry-run", *model)
    assert long.exit_code == 2, long.output
    assert long.stderr.splitlines()[0] == (
        "--prompt:1: prompt: expanded prompt 1: longer than 10,000 characters (10,001)")
    assert jobs(home) == 0


def test_no_job_is_larger_than_the_cap_yes_or_not(home: Home, tiny_checkpoint: Path) -> None:
    """Counted before any item is made: 2000 rows x 10,000 images is 20 million item specs,
    more memory than the machine has, refused in the time it takes to read the file."""
    prompts = home.path / "p.txt"
    prompts.write_text("".join(f"a red boat number {n}\n" for n in range(2000)))
    model = ["--model", str(tiny_checkpoint)]
    for extra in (["--dry-run"], ["--yes"]):
        result = home.run("submit", str(prompts), "-n", "10000", *extra, *model)
        assert result.exit_code == 2, result.output
        assert result.stderr.splitlines() == [
            f"{prompts}:101: images: the file makes 20,000,000 images, more than 1,000,000 "
            "(SDQ_MAX_JOB_ITEMS, which --yes does not lift) from this line on",
            f"{prompts}: 1 problem(s); nothing was submitted"]
    home.env["SDQ_MAX_JOB_ITEMS"] = "5"
    small = home.run("submit", "-p", "a {red|green|blue} boat", "-n", "2", "--yes", *model)
    assert small.exit_code == 2
    assert "--prompt:1: images: the file makes 6 images, more than 5" in small.stderr
    assert jobs(home) == 0
