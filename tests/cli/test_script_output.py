"""Habits scripts rely on: `--json` on every command that prints data, `--limit 0` for
everything, and `sdq config path` to find the database and the images."""
from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import click
import pytest

from sdq.cli.main import cli
from sdq.db.session import HEAD_REVISION

from .conftest import Home
from .test_help import commands

SERVICES = {("worker",), ("scheduler",)}
"""Long-running processes: they log, they print no result."""


@pytest.mark.parametrize("path", [p for p in commands() if p not in SERVICES], ids=" ".join)
def test_every_command_that_prints_a_result_takes_json(path: tuple[str, ...]) -> None:
    command: click.Command = cli
    for name in path:
        command = command.get_command(click.Context(command), name)  # type: ignore[attr-defined]
    if isinstance(command, click.Group) and not command.invoke_without_command:
        return
    assert "--json" in {opt for param in command.params for opt in getattr(param, "opts", [])}


def stdout_json(home: Home, *args: str) -> object:
    result = home.run(*args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_limit_zero_means_all(home: Home) -> None:
    for n in range(3):
        home.add_job([f"a red fox {n}", f"a red boat {n}"], done=2)
    assert len(stdout_json(home, "jobs", "--limit", "1")) == 1  # type: ignore[arg-type]
    assert len(stdout_json(home, "jobs", "--limit", "0")) == 3  # type: ignore[arg-type]
    assert len(stdout_json(home, "search", "red", "--limit", "2")) == 2  # type: ignore[arg-type]
    everything = stdout_json(home, "search", "red", "--limit", "0")
    assert [r["id"] for r in everything] == [6, 5, 4, 3, 2, 1]  # type: ignore[index, union-attr]
    sheet = stdout_json(home, "sheet", "--query", "red", "--limit", "0", "-o",
                        str(home.path / "sheet.png"))
    assert sheet["images"] == 6  # type: ignore[index]
    assert home.run("jobs", "--limit", "-1").exit_code == 2


def test_config_path_points_at_the_database_and_the_images(home: Home) -> None:
    home.add_job(["a lighthouse"], done=1)
    paths = stdout_json(home, "config", "path")
    assert paths == {"config": home.env["SDQ_CONFIG"], "home": str(home.path / "home"),  # type: ignore[comparison-overlap]
                     "database": str(home.path / "home" / "sdq.db"),
                     "images": str(home.path / "home" / "images")}
    database = home.run("config", "path", "database").stdout.strip()
    with sqlite3.connect(database) as connection:
        assert connection.execute("SELECT prompt FROM items").fetchall() == [("a lighthouse",)]
    images = Path(home.run("config", "path", "images").stdout.strip())
    assert [p.name for p in images.rglob("*.png")] == ["1.png"]
    assert home.run("config", "path", "bucket").exit_code == 2


def test_config_path_masks_a_server_password(home: Home) -> None:
    home.env["SDQ_DATABASE_URL"] = "postgresql://sdq:hunter2@db.internal/sdq"
    shown = home.run("config", "path", "database").stdout
    assert "hunter2" not in shown and "db.internal/sdq" in shown


def test_results_of_commands_that_do_one_thing_as_json(home: Home, tmp_path: Path) -> None:
    job = home.add_job(["a red fox", "a boat"], done=2)
    assert stdout_json(home, "db", "current") == {  # type: ignore[comparison-overlap]
        "database": f"sqlite:///{home.path / 'home' / 'sdq.db'}", "current": HEAD_REVISION,
        "head": HEAD_REVISION, "up_to_date": True}
    upgraded = stdout_json(home, "db", "upgrade")
    assert upgraded["before"] == upgraded["after"]  # type: ignore[index]
    exported = stdout_json(home, "export", str(job.id), "--format", "imagefolder",
                           "-o", str(tmp_path / "out"))
    assert exported == {"destination": str(tmp_path / "out"), "format": "imagefolder",  # type: ignore[comparison-overlap]
                        "items": 2, "shards": 1, "written": 1, "skipped": 0}
    gallery = stdout_json(home, "gallery", str(job.id), "-o", str(tmp_path / "gallery"))
    assert gallery == {"page": str(tmp_path / "gallery" / "index.html"), "images": 2}  # type: ignore[comparison-overlap]
