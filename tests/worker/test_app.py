"""The Celery app is built from the settings when first asked for, never at import: a broken
config file cannot break a command that only needs the module's names, and `celery -A
sdq.worker.app` still finds its app. Every Redis client sdq makes gives up on a broker that
stops answering."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import redis

from sdq.core.errors import Unavailable
from sdq.core.settings import Settings
from sdq.jobs.broker import check_broker, create_app
from sdq.worker.broker_keys import upgrade_broker_keys

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


@contextmanager
def silent_server() -> Iterator[str]:
    """A Redis URL whose server takes connections (the kernel completes them) and never
    answers: a paused Redis, or one behind a NAT that forgot the connection."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    try:
        yield f"redis://127.0.0.1:{listener.getsockname()[1]}/0"
    finally:
        listener.close()  # resets the connections it never took


def ends_within(seconds: float, call: Callable[[], object]) -> BaseException | None:
    """What `call` raised, if it returned or raised within `seconds` (else AssertionError):
    a client without a socket timeout would wait on a silent server for ever."""
    raised: list[BaseException | None] = []

    def run() -> None:
        try:
            call()
            raised.append(None)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            raised.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert raised, f"still waiting after {seconds}s"
    return raised[0]


def test_a_broker_that_never_answers_is_a_timeout_not_a_hang() -> None:
    with silent_server() as url:
        checked = ends_within(60, lambda: check_broker(url, timeout=1))
        assert isinstance(checked, Unavailable) and "Timeout" in str(checked), checked
        upgraded = ends_within(60, lambda: upgrade_broker_keys(url))
        assert isinstance(upgraded, redis.exceptions.TimeoutError), upgraded


def test_the_apps_redis_clients_have_socket_timeouts(redis_db: str, tmp_path: Path) -> None:
    settings = Settings.load({"SDQ_HOME": str(tmp_path), "SDQ_CONFIG": str(tmp_path / "none.toml"),
                              "SDQ_BROKER_URL": redis_db})
    with create_app(settings).connection_for_write() as connection:
        options = connection.default_channel.client.connection_pool.connection_kwargs
        assert (options["socket_timeout"], options["socket_connect_timeout"]) == (30, 10)
