"""Nothing a test starts outlives it: a worker process, a proxy, a thread.

A process left running by one test (a worker holding a transaction open, a paused proxy)
stalls another test much later, far from its cause: in one CI run a session idle in
transaction held a fixture's DROP SCHEMA for ten minutes, and its owner was gone before
anyone could see it. Here every test is checked when it ends, the session when it ends:
what it leaves is killed (processes) and named in an error on that test.

The test process is made a "child subreaper" (Linux), so that a process orphaned by a test
(a Celery pool process whose `sdq worker` parent was killed alone) comes back to it as a
child instead of to init, where no check would see it. Checking costs a few milliseconds a
test: a thread list, and one pass over /proc for the process tree.
"""
from __future__ import annotations

import ctypes
import os
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import psutil
import pytest

GRACE_S = float(os.environ.get("SDQ_TEST_LEAK_GRACE_S", "5"))
"""How long what a test started may take to finish after it (a thread being joined, a
process exiting on its signal) before it counts as left behind."""
LIBRARY_THREADS = frozenset({"tqdm_monitor"})
"""Threads a library starts once, on first use, to live as long as the process (tqdm's
progress-bar monitor, through Hugging Face's downloads and writers): not a test's to stop."""
_PR_SET_CHILD_SUBREAPER = 36


def pytest_configure(config: pytest.Config) -> None:
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


_shared: set[threading.Thread | tuple[int, float]] = set()
"""Threads and processes that module and session fixtures started: they outlive the test
that first asked for them by design (the S3 server, a module's workers), and are checked
when the session ends instead."""


@pytest.hookimpl(wrapper=True)
def pytest_fixture_setup(fixturedef: pytest.FixtureDef[object]) -> Iterator[object]:
    if fixturedef.scope == "function":
        return (yield)
    before = Running.now()
    try:
        return (yield)
    finally:
        after = Running.now()
        _shared.update(after.threads - before.threads, after.processes - before.processes)


@dataclass(frozen=True)
class Running:
    """The threads and descendant processes alive at one moment."""

    threads: frozenset[threading.Thread]
    """The objects, not their idents: an ended thread's ident is given to the next one."""
    processes: frozenset[tuple[int, float]]
    """(pid, start time): a pid alone may be reused."""

    @classmethod
    def now(cls) -> Running:
        return cls(frozenset(threading.enumerate()), frozenset(_key(p) for p in _descendants()))


def left_since(before: Running, *, shared: bool = False) -> list[str]:
    """What was started since `before` (with `shared`, what shared fixtures started too) and
    still runs GRACE_S later (waited for as it ends, not slept), each described; the
    processes among it are killed."""
    deadline = time.monotonic() + GRACE_S
    skip = before.threads if shared else before.threads | _shared
    threads = [t for t in threading.enumerate() if t not in skip and t.name not in LIBRARY_THREADS]
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    processes = [p for p in _descendants()
                 if _key(p) not in before.processes and (shared or not _of_shared(p))]
    _, alive = psutil.wait_procs(processes, timeout=max(0.0, deadline - time.monotonic()))
    left = [f"thread {t.name!r} (daemon={t.daemon})" for t in threads if t.is_alive()]
    left += [f"process {p.pid}: {_command(p)}" for p in alive]
    for process in alive:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=GRACE_S)
    return left


def _descendants() -> list[psutil.Process]:
    """Live descendants: zombies have ended (an orphan's stays until this process ends)."""
    alive = []
    for process in psutil.Process().children(recursive=True):
        try:
            if process.status() != psutil.STATUS_ZOMBIE:
                alive.append(process)
        except psutil.NoSuchProcess:
            pass
    return alive


def _of_shared(process: psutil.Process) -> bool:
    """Started by a shared fixture, or by a process it started (a worker's pool process)."""
    try:
        return any(_key(p) in _shared for p in (process, *process.parents()))
    except psutil.NoSuchProcess:
        return False


def _key(process: psutil.Process) -> tuple[int, float]:
    """The pid and when the process started, in clock ticks since boot where Linux gives them:
    psutil's `create_time` adds the boot time, which moves when the wall clock is stepped (one
    CI run saw every shared S3 server taken for a leak after such a step)."""
    try:
        with open(f"/proc/{process.pid}/stat", "rb") as stat:
            return process.pid, float(stat.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        pass
    try:
        return process.pid, process.create_time()
    except psutil.NoSuchProcess:
        return process.pid, 0.0


def _command(process: psutil.Process) -> str:
    try:
        return " ".join(process.cmdline())[:300] or process.name()
    except psutil.Error:
        return "(ended)"


@pytest.fixture(scope="session", autouse=True)
def _nothing_outlives_the_session() -> Iterator[None]:
    """What session and module fixtures started is checked once they are all torn down."""
    before = Running.now()
    yield
    left = left_since(before, shared=True)
    if left:
        pytest.fail("left running after the tests: " + "; ".join(left), pytrace=False)


@pytest.fixture(autouse=True)
def _nothing_outlives_its_test() -> Iterator[None]:
    before = Running.now()
    yield
    left = left_since(before)
    if left:
        pytest.fail("left running by this test: " + "; ".join(left), pytrace=False)
