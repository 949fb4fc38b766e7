"""Files the commands write follow the umask like any tool's: a gallery copied to a web server
must be readable by it, not 0600."""
from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from sdq.cli.main import cli

from .conftest import Home


@pytest.fixture
def umask_022() -> Iterator[None]:
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def modes(folder: Path) -> dict[str, str]:
    return {path.relative_to(folder).as_posix(): oct(stat.S_IMODE(path.stat().st_mode))
            for path in sorted(folder.rglob("*")) if path.is_file()}


def test_get_gallery_and_sheet_write_0644_under_umask_022(home: Home, tmp_path: Path,
                                                          umask_022: None) -> None:
    job = home.add_job(["a red fox", "a boat"], done=2)
    assert home.run("get", "--job", str(job.id), "-o", str(tmp_path / "get")).exit_code == 0
    assert home.run("gallery", str(job.id), "-o", str(tmp_path / "gallery")).exit_code == 0
    assert home.run("sheet", str(job.id), "-o", str(tmp_path / "sheet" / "s.png")).exit_code == 0
    written = {**modes(tmp_path / "get"), **modes(tmp_path / "gallery"), **modes(tmp_path / "sheet")}
    assert len(written) >= 2 + 2 + 1 + 2 + 2 + 1  # images, records, page, thumbs, sheet
    assert set(written.values()) == {"0o644"}, written


def test_generate_writes_0644_under_umask_022(tmp_path: Path, tiny_checkpoint: Path,
                                              umask_022: None) -> None:
    env = {"SDQ_HOME": str(tmp_path / "home"), "SDQ_CONFIG": str(tmp_path / "none.toml")}
    result = CliRunner().invoke(cli, ["generate", "a boat", "--model", str(tiny_checkpoint),
                                      "--steps", "1", "--width", "64", "--height", "64",
                                      "-o", str(tmp_path / "out" / "boat.png")], env=env)
    assert result.exit_code == 0, result.output
    assert modes(tmp_path / "out") == {"boat.png": "0o644"}
    assert modes(tmp_path / "home")["hashes.json"] == "0o644"  # the model hash cache too
