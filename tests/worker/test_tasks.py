"""The task's process state: settings read when first used, and one runner per pool process,
whoever asks first (the task, the heartbeat, the shutdown hook all see the same one)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

_ASK = """
import sdq.worker.tasks as tasks
read_at_import = tasks.settings.cache_info().currsize
first = tasks.run_batches.runner("task")
print(read_at_import, tasks.BatchTask.runner("heartbeat") is first, tasks.run_batches.max_retries)
"""


def test_the_task_and_the_heartbeat_share_one_runner_and_settings_wait_for_use(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text("max_attempts = 5\n")
    env = {"SDQ_HOME": str(tmp_path), "SDQ_CONFIG": str(config)}
    done = subprocess.run([sys.executable, "-c", _ASK], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["0", "True", "5"]
