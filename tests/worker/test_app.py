"""The Celery app is built from the settings when first asked for, never at import: a broken
config file cannot break a command that only needs the module's names, and `celery -A
sdq.worker.app` still finds its app."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

_FIND = """
import json, sys
import sdq.worker.app
from celery.app.utils import find_app
app = find_app("sdq.worker.app")
print(json.dumps({"main": app.main, "broker": app.conf.broker_url,
                  "timeout": app.conf.broker_transport_options["visibility_timeout"]}))
"""


def python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=300)


def test_celery_finds_the_app_built_from_the_settings(tmp_path: Path) -> None:
    env = {"SDQ_HOME": str(tmp_path), "SDQ_CONFIG": str(tmp_path / "config.toml"),
           "SDQ_BROKER_URL": "redis://127.0.0.1:6379/9"}
    (tmp_path / "config.toml").write_text("visibility_timeout = 77\n")
    done = python(_FIND, env)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"main": "sdq", "broker": "redis://127.0.0.1:6379/9",
                                       "timeout": 77}


def test_importing_the_module_reads_no_settings(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text("max_attempts = \n")
    env = {"SDQ_HOME": str(tmp_path), "SDQ_CONFIG": str(config)}
    imported = python("from sdq.jobs.broker import PRIORITIES, queue_name; "
                      "import sys; print('celery' in sys.modules)", env)
    assert (imported.returncode, imported.stdout.strip()) == (0, "False"), imported.stderr
    built = python("import sdq.worker.app as m; m.app", env)
    assert built.returncode == 1 and f"{config}: not valid TOML" in built.stderr
