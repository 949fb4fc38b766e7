"""Output into a pipe whose reader is gone (`sdq show 1 | head -1`) ends quietly, as Unix tools
do: no error line, no traceback, exit status 0. The reader's end is closed before the command
writes anything, so every write fails: what `head` does to a longer output, made certain."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import Home

SDQ = Path(sys.executable).parent / "sdq"


@pytest.mark.parametrize("args", [["show", "1"], ["config"], ["search", "a", "--json"],
                                  ["jobs"], ["show", "1", "--json"]])
def test_a_closed_pipe_ends_the_command_quietly(home: Home, args: list[str]) -> None:
    home.add_job([f"a red fox {n}" for n in range(30)], done=30)
    read, write = os.pipe()
    os.close(read)
    try:
        done = subprocess.run([str(SDQ), *args], stdout=write, stderr=subprocess.PIPE,
                              env={**home.env, "PATH": str(SDQ.parent)}, text=True, timeout=120)
    finally:
        os.close(write)
    assert (done.returncode, done.stderr) == (0, "")
