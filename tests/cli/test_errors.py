"""One mistake, one exit status, whichever command meets it; and a broken config file is one
line naming the file and the key, for every command (see the table in docs/cli.md)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from sdq.db.models import Job, Model, Schedule
from tests.cli.conftest import Home

BAD_INPUT, NOT_FOUND, UNAVAILABLE = 2, 3, 4


def one_line_error(output: str) -> str:
    """The error's line: the last one, after at most progress messages, and the only one."""
    assert "Traceback" not in output
    lines = output.splitlines()
    assert lines and lines[-1].startswith("Error: ")
    assert sum(line.startswith("Error") for line in lines) == 1
    return lines[-1]


@pytest.fixture
def prompts(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("a lighthouse\n")
    return path


BREAKAGES = {
    "not TOML": ("max_attempts = \n", "not valid TOML", "line 1"),
    "a wrong type": ('max_attempts = "x"\n', "max_attempts: expected a whole number", "'x'"),
    "an unknown key": ('databse_url = "sqlite:///x.db"\n', "databse_url: unknown key",
                       "did you mean 'database_url'?"),
    "a table for a value": ("[model]\nname = 'x'\n", "model: expected one value", "table"),
}


def every_command(tmp_path: Path, prompts: Path) -> list[list[str]]:
    return [
        ["jobs"], ["status", "1"], ["watch", "1"], ["search", "fox"], ["show", "1"],
        ["get", "1", "-o", str(tmp_path / "got")], ["verify", "1"], ["config"], ["doctor"],
        ["models", "list"], ["models", "remove", "x"], ["schedule", "list"], ["db", "current"],
        ["purge", "1", "--yes"], ["export", "1", "--format", "webdataset", "-o", str(tmp_path)],
        ["sheet", "1", "-o", str(tmp_path / "s.png")], ["retry", "1"], ["cancel", "1"],
        ["reconcile"], ["resume", "1"], ["submit", str(prompts)], ["workers"], ["worker"],
        ["generate", "a fox", "--model", str(tmp_path / "x.safetensors")], ["reproduce", "1"],
        ["schedule", "add", "n", "--cron", "0 2 * * *", str(prompts)], ["scheduler", "--once"],
    ]


@pytest.mark.parametrize("breakage", list(BREAKAGES))
def test_a_broken_config_file_is_one_line_naming_file_and_key_for_every_command(
        home: Home, tmp_path: Path, prompts: Path, breakage: str) -> None:
    text, problem, detail = BREAKAGES[breakage]
    config = Path(home.env["SDQ_CONFIG"])
    config.write_text(text)
    for args in every_command(tmp_path, prompts):
        result = home.run(*args)
        line = one_line_error(result.output)
        assert (result.exit_code, line.startswith(f"Error: {config}: {problem}"), detail in line) \
            == (BAD_INPUT, True, True), (args, result.output)


def test_help_needs_no_config(home: Home) -> None:
    Path(home.env["SDQ_CONFIG"]).write_text("max_attempts = \n")
    assert home.run("--help").exit_code == 0
    assert home.run("jobs", "--help").exit_code == 0


def test_an_unknown_model_is_not_found_in_every_command(home: Home, tmp_path: Path,
                                                        prompts: Path) -> None:
    home.add_job(["a red fox"], done=1)  # its model's recorded source, /m/tiny, is gone
    missing = str(tmp_path / "gone.safetensors")
    commands = [
        ["generate", "a fox", "--model", missing], ["submit", str(prompts), "--model", missing],
        ["schedule", "add", "n", "--cron", "0 2 * * *", str(prompts), "--model", missing],
        ["models", "add", missing, "--name", "x"], ["models", "remove", "gone"],
        ["reproduce", "1", "--alone"],  # made outside a batch: alone is all it can be
    ]
    for args in commands:
        result = home.run(*args)
        one_line_error(result.stderr)
        assert result.exit_code == NOT_FOUND, (args, result.output)
    home.env["SDQ_BROKER_URL"] = "redis://127.0.0.1:1/0"
    worker = home.run("worker", "--model", missing)
    assert worker.exit_code == NOT_FOUND and "gone.safetensors" in one_line_error(worker.stderr)


def test_an_unknown_job_or_item_is_not_found_in_every_command(home: Home, tmp_path: Path) -> None:
    home.add_job(["a red fox"], done=1)
    commands = [
        ["status", "9"], ["watch", "9"], ["resume", "9"], ["retry", "9"], ["cancel", "9"],
        ["purge", "9", "--yes"], ["export", "9", "--format", "webdataset", "-o", str(tmp_path)],
        ["sheet", "9", "-o", str(tmp_path / "s.png")], ["gallery", "9", "-o", str(tmp_path / "g")],
        ["get", "--job", "9", "-o", str(tmp_path)],
        ["show", "9"], ["get", "9", "-o", str(tmp_path)], ["reproduce", "9"], ["verify", "9"],
    ]
    for args in commands:
        result = home.run(*args)
        line = one_line_error(result.stderr)
        assert (result.exit_code, "9" in line) == (NOT_FOUND, True), (args, result.output)


def test_an_unreachable_database_is_unavailable_in_every_command(home: Home, tmp_path: Path,
                                                                 prompts: Path) -> None:
    home.env["SDQ_DATABASE_URL"] = "postgresql://sdq:hunter2@127.0.0.1:1/sdq"
    commands = [
        ["jobs"], ["status", "1"], ["watch", "1"], ["search", "fox"], ["show", "1"],
        ["get", "1", "-o", str(tmp_path)], ["verify", "1"], ["models", "list"],
        ["schedule", "list"], ["db", "current"], ["purge", "1", "--yes"],
        ["export", "1", "--format", "webdataset", "-o", str(tmp_path)], ["retry", "1"],
        ["cancel", "1"], ["reconcile"], ["resume", "1"], ["submit", str(prompts)],
        ["schedule", "run-now", "n"], ["scheduler", "--once"],
    ]
    for args in commands:
        result = home.run(*args)
        line = one_line_error(result.stderr)
        assert (result.exit_code, "127.0.0.1" in line, "hunter2" in line) == \
            (UNAVAILABLE, True, False), (args, result.output)


def not_models(tmp_path: Path) -> dict[str, str]:
    """What users pass as --model by mistake, or to probe: each must be refused unhashed."""
    fake = tmp_path / "fake.safetensors"
    fake.write_bytes(b"{}")
    header_only = tmp_path / "not-sd.safetensors"
    header = b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}'
    header_only.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 4)
    (tmp_path / "empty").mkdir()
    table = tmp_path / "table.csv"
    table.write_text("a,b\n")
    return {"fake": str(fake), "not-sd": str(header_only), "empty": str(tmp_path / "empty"),
            "csv": str(table), "device": "/dev/zero", "etc": "/etc", "passwd": "/etc/passwd",
            "up": str(Path(os.path.relpath("/etc", Path.cwd())))}


def test_what_is_not_a_model_is_refused_before_anything_is_recorded(
        home: Home, tmp_path: Path, prompts: Path) -> None:
    job = home.add_job(["a red fox"], done=1)
    for label, model in not_models(tmp_path).items():
        commands = [
            ["submit", str(prompts), "--model", model], ["submit", str(prompts), "--model", model,
                                                         "--dry-run"],
            ["generate", "a fox", "--model", model, "-o", str(tmp_path / "out.png")],
            ["schedule", "add", "n", "--cron", "0 2 * * *", str(prompts), "--model", model],
            ["models", "add", model, "--name", "x"],
            ["reproduce", "1", "--alone", "--model", model],
        ]
        for args in commands:
            result = home.run(*args)
            line = one_line_error(result.stderr)
            assert result.exit_code == BAD_INPUT, (label, args, result.output)
            assert "not a" in line or "no weights under" in line, (label, args, line)
    with Session(home.engine) as session:
        assert [j.id for j in session.scalars(select(Job))] == [job.id]
        assert session.scalar(select(func.count()).select_from(Model)) == 1
        assert session.scalar(select(func.count()).select_from(Schedule)) == 0
    assert not (tmp_path / "out.png").exists()


def test_values_no_database_stores_alike_are_refused_before_either_records(
        any_home: Home, tmp_path: Path, tiny_checkpoint: Path) -> None:
    model = ["--model", str(tiny_checkpoint)]
    nul = tmp_path / "nul.jsonl"
    nul.write_text('{"prompt": "a fox"}\n{"prompt": "a\\u0000b", "tags": ["\\udc80"]}\n')
    plain = tmp_path / "plain.txt"
    plain.write_text("a fox\n")
    for args in (["submit", str(nul), *model], ["submit", str(nul), *model, "--dry-run"],
                 ["schedule", "add", "n", "--cron", "0 2 * * *", str(nul), *model]):
        result = any_home.run(*args)
        assert result.exit_code == BAD_INPUT, (args, result.output)
        assert f"{nul}:2: prompt: contains a NUL character (U+0000) at character 2" in result.stderr
        assert f"{nul}:2: tags: contains a lone surrogate (U+DC80) at character 1" in result.stderr
    recording = (["submit", str(plain)], ["schedule", "add", "n", "--cron", "0 2 * * *", str(plain)])
    for option in (["--cfg", "nan"], ["--cfg", "1e308"], ["--eta", "inf"], ["--tag", "\udc80"],
                   ["--negative-prompt", "x" * 10_001], ["--name", "a\x00b"]):
        commands = ([["submit", str(plain)]] if option[0] == "--name" else
                    [*recording, *([["generate", "a fox"]] if option[0] != "--tag" else [])])
        for command in commands:
            result = any_home.run(*command, *model, *option)
            assert result.exit_code == BAD_INPUT and "Invalid value for" in result.output, \
                (command, option, result.output)
    with Session(any_home.engine) as session:
        assert session.scalar(select(func.count()).select_from(Job)) == 0
        assert session.scalar(select(func.count()).select_from(Schedule)) == 0
