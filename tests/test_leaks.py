"""The suite's own guards: a process or thread a test leaves running, even one orphaned by its
parent, fails that test and is stopped (tests/leaks.py); a transaction left open on a test
database ends (tests/services.py)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import psutil

from tests.services import STALL_S, scratch_database

LEAKY = '''
import subprocess, threading

def test_leaves_a_child():
    subprocess.Popen(["sleep", "600"])

def test_leaves_an_orphan():
    subprocess.run(["sh", "-c", "sleep 601 & exit 0"], check=True)

def test_leaves_a_thread():
    threading.Thread(target=threading.Event().wait, name="forever", daemon=True).start()

def test_cleans_up():
    subprocess.run(["true"], check=True)
'''


def test_what_a_test_leaves_running_fails_it_and_is_stopped(tmp_path: Path) -> None:
    (tmp_path / "test_leaky.py").write_text(LEAKY)
    root = Path(__file__).resolve().parent.parent
    env = {**{k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"},  # its own report
           "PYTHONPATH": str(root), "SDQ_TEST_LEAK_GRACE_S": "0.5"}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "tests.leaks", "-p",
                          "no:cacheprovider", "test_leaky.py"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 1, run.stdout + run.stderr
    out = run.stdout
    for test, left in (("test_leaves_a_child", r"process \d+: sleep 600"),
                       ("test_leaves_an_orphan", r"process \d+: sleep 601"),
                       ("test_leaves_a_thread", r"thread 'forever' \(daemon=True\)")):
        assert re.search(rf"ERROR at teardown of {test} _+\nleft running by this test: {left}\n",
                         out), out
    assert "left running after the tests: thread 'forever'" in out, out  # daemon or not
    assert "4 passed, 4 errors" in out, out
    pids = {int(pid) for pid in re.findall(r"process (\d+): sleep 60[01]", out)}
    assert len(pids) == 2
    for pid in pids:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_a_test_database_ends_a_transaction_left_idle(tmp_path: Path) -> None:
    """A leaked session then fails within a minute instead of holding the next fixture's
    DROP SCHEMA for as long as CI waits."""
    with scratch_database("postgresql", tmp_path) as engine, engine.connect() as connection:
        shown = connection.exec_driver_sql("SHOW idle_in_transaction_session_timeout").scalar()
        assert shown == f"{STALL_S // 60}min"
