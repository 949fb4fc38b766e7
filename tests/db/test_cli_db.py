"""`sdq db`: upgrade, current and downgrade through the command line, errors in one line."""
from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from sdq.cli.main import cli
from sdq.db.session import head_revision
from tests.services import scratch_database


def run(tmp_path: Path, *args: str, url: str | None = None, input: str | None = None) -> Result:
    env = {"SDQ_HOME": str(tmp_path / "home"), "SDQ_CONFIG": str(tmp_path / "none.toml"),
           "SDQ_DATABASE_URL": url}
    return CliRunner().invoke(cli, ["db", *args], env=env, input=input)


def test_upgrade_current_downgrade_on_the_embedded_database(tmp_path: Path) -> None:
    head = head_revision()
    assert "empty (no sdq schema)" in run(tmp_path, "current").output
    result = run(tmp_path, "upgrade")
    assert result.exit_code == 0 and f"upgraded from an empty database to {head}" in result.output
    assert (tmp_path / "home" / "sdq.db").is_file()
    assert f"already at {head}" in run(tmp_path, "upgrade").output
    assert f"{head} (head)" in run(tmp_path, "current").output

    refused = run(tmp_path, "downgrade", "base", input="n\n")
    assert refused.exit_code == 1 and f"{head} (head)" in run(tmp_path, "current").output
    assert "now at base" in run(tmp_path, "downgrade", "base", "--yes").output


def test_upgrade_on_a_server(tmp_path: Path) -> None:
    with scratch_database("postgresql", tmp_path) as engine:
        url = engine.url.render_as_string(hide_password=False)
        assert run(tmp_path, "upgrade", url=url).exit_code == 0
        assert f"{head_revision()} (head)" in run(tmp_path, "current", url=url).output


@pytest.mark.parametrize(
    ("url", "args", "code", "message"),
    [
        ("mysql://sdq@host/sdq", ["current"], 2, "SDQ_DATABASE_URL: unsupported database 'mysql'"),
        ("sdq:hunter2@host", ["current"], 2, "SDQ_DATABASE_URL: not a database URL"),
        ("postgresql://sdq:hunter2@127.0.0.1:1/sdq", ["current"], 4,
         "127.0.0.1:1/sdq: connection"),
        (None, ["downgrade", "nowhere", "--yes"], 2, "Can't locate revision"),
    ],
)
def test_errors_are_one_readable_line(
    tmp_path: Path, url: str | None, args: list[str], code: int, message: str
) -> None:
    result = run(tmp_path, *args, url=url)
    assert result.exit_code == code
    assert message in result.output and "Traceback" not in result.output
    assert "hunter2" not in result.output


@pytest.mark.parametrize("args", [[], ["upgrade"], ["current"], ["downgrade"]])
def test_every_command_has_help_with_an_example(tmp_path: Path, args: list[str]) -> None:
    result = run(tmp_path, *args, "--help")
    assert result.exit_code == 0 and "Example" in result.output
