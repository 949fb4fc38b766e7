"""The deployment files, checked without a Docker engine: every sdq command line they run
parses against the real CLI, every SDQ_* setting they pass is one sdq reads, the compose
file is safe by default (loopback ports, passwords, pinned images, restarts, healthchecks),
and the worker serves every GPU it sees at the batch size the GPU holds (on a machine whose
fake `nvidia-smi` lists two GPUs)."""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

import click
import pytest
import yaml

from sdq.cli.main import cli
from sdq.cli.worker import plan_gpus
from sdq.core.settings import Settings

from .cluster import WorkerProcess, wait_for

ROOT = Path(__file__).parents[2]
SETTINGS = {f"SDQ_{f.name.upper()}" for f in fields(Settings)}
SECRETS = {"REDIS_PASSWORD", "POSTGRES_PASSWORD", "MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD",
           "FLOWER_BASIC_AUTH"}
VARIABLE = re.compile(r"\$\$|\$\{(\w+)(?:(:-|:\?)([^}]*))?\}")
"""Compose's `$$` (a literal `$`), `${NAME}`, `${NAME:-default}` and `${NAME:?error}`."""


def dotenv() -> dict[str, str]:
    lines = (ROOT / ".env.example").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


def interpolate(text: str, values: dict[str, str]) -> str:
    """What compose reads with .env.example's values, its empty secrets filled in."""
    def value(match: re.Match[str]) -> str:
        name, kind, default = match.groups()
        if name is None:
            return "$"
        assert name in values or kind == ":-", f"${{{name}}} is in neither .env.example nor a default"
        if kind == ":?":
            return values[name] or f"{name.lower()}-filled-in"
        return values.get(name) or default or ""
    return VARIABLE.sub(value, text)


def raw_compose() -> dict[str, Any]:
    """The file as written, variables not substituted: to see where a value comes from."""
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def compose() -> dict[str, Any]:
    return yaml.safe_load(interpolate((ROOT / "docker-compose.yml").read_text(), dotenv()))


def one_shots(services: dict[str, Any]) -> set[str]:
    """Services others wait to see finish (bucket creation, migrations): they are meant to exit."""
    return {name for s in services.values() for name, dep in (s.get("depends_on") or {}).items()
            if dep.get("condition") == "service_completed_successfully"}


def sdq_command_lines() -> list[list[str]]:
    services = compose()["services"]
    lines = [s["command"] for s in services.values()
             if isinstance(s.get("command"), list) and s["command"][0] == "sdq"]
    lines += [s["healthcheck"]["test"][1:] for s in services.values()
              if s.get("healthcheck", {}).get("test", [None, None])[:2] == ["CMD", "sdq"]]
    docker_cmd = re.search(r"^CMD (\[.*\])$", (ROOT / "Dockerfile").read_text(), re.M)
    assert docker_cmd, "the Dockerfile has a CMD"
    lines.append(yaml.safe_load(docker_cmd.group(1)))
    return lines


def parse(args: list[str]) -> click.Command:
    """Resolve subcommands and parse the options the way `sdq` would, without running it."""
    command: click.Command = cli
    while isinstance(command, click.Group) and args and not args[0].startswith("-"):
        found = command.get_command(click.Context(command), args[0])
        assert found is not None, f"sdq has no command {args[0]!r}"
        command, args = found, args[1:]
    command.make_context(command.name or "sdq", list(args))
    return command


def test_every_sdq_command_in_the_deployment_exists() -> None:
    lines = sdq_command_lines()
    assert {line[1] for line in lines} >= {"db", "worker", "doctor"}
    for line in lines:
        parse(line[1:])


def test_the_worker_service_reserves_gpus_and_waits_for_the_schema() -> None:
    services = compose()["services"]
    assert {"redis", "postgres", "minio", "minio-bucket", "migrate", "worker", "flower"} <= set(services)
    worker = services["worker"]
    [device] = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert worker["depends_on"]["migrate"]["condition"] == "service_completed_successfully"


@pytest.mark.parametrize("source", ["docker-compose.yml", ".env.example"])
def test_every_sdq_setting_is_one_sdq_reads(source: str) -> None:
    used = set(re.findall(r"\bSDQ_[A-Z_]+\b", (ROOT / source).read_text()))
    assert used and used <= SETTINGS, used - SETTINGS


def test_every_published_port_listens_on_loopback_unless_told_otherwise() -> None:
    env = dotenv()
    published = [(name, port) for name, s in raw_compose()["services"].items()
                 for port in s.get("ports", [])]
    assert {name for name, _ in published} >= {"redis", "postgres", "minio", "flower"}
    for name, port in published:
        host = port["host_ip"] if isinstance(port, dict) else str(port).rsplit(":", 2)[0]
        variable = re.fullmatch(r"\$\{(\w+):-127\.0\.0\.1\}", host)
        assert host == "127.0.0.1" or variable, f"{name} publishes {port} beyond loopback"
        if variable:
            assert env.get(variable.group(1), "127.0.0.1") == "127.0.0.1", (name, port)


def test_every_image_is_pinned_to_a_release() -> None:
    for name, service in compose()["services"].items():
        if "build" in service:
            continue
        image = service["image"]
        tag = image.rsplit("/", 1)[-1].partition(":")[2]
        assert tag and tag != "latest" and re.search(r"\d", tag), f"{name}: {image} is not pinned"


def test_every_long_running_service_restarts_and_has_a_healthcheck() -> None:
    services = compose()["services"]
    running = set(services) - one_shots(services)
    assert running >= {"redis", "postgres", "minio", "worker", "scheduler", "flower"}
    for name in running:
        assert services[name].get("restart") in ("always", "unless-stopped", "on-failure"), name
        check = services[name].get("healthcheck", {})
        assert check.get("test") and not check.get("disable"), f"{name} has no healthcheck"


def test_secrets_are_required_and_not_shipped() -> None:
    text = (ROOT / "docker-compose.yml").read_text()
    uses = [m for m in VARIABLE.finditer(text) if m.group(1) in SECRETS]
    assert {m.group(1) for m in uses} == SECRETS
    for use in uses:
        assert use.group(2) == ":?", f"{use.group(0)} starts compose without the secret"
    env = dotenv()
    assert all(env[name] == "" for name in SECRETS - {"MINIO_ROOT_USER"}), \
        "a copied .env.example must not start services with a published password"


def test_redis_asks_for_the_password_every_client_url_carries() -> None:
    services = compose()["services"]
    password = interpolate("${REDIS_PASSWORD:?}", dotenv())
    command = services["redis"]["command"]
    assert command[command.index("--requirepass") + 1] == password
    urls = re.findall(r"redis://\S*", interpolate((ROOT / "docker-compose.yml").read_text(), dotenv()))
    assert urls and all(url.startswith(f"redis://:{password}@") for url in urls), urls


def test_flower_asks_for_credentials() -> None:
    flower = raw_compose()["services"]["flower"]
    assert flower["environment"]["FLOWER_BASIC_AUTH"].startswith("${FLOWER_BASIC_AUTH:?")
    assert "unauthenticated" not in str(flower).lower()


def test_git_ignores_the_env_file() -> None:
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    assert subprocess.run(["git", "check-ignore", "-q", ".env"], cwd=ROOT).returncode == 0


def test_the_worker_uses_every_gpu_and_the_batch_size_each_holds_by_default() -> None:
    worker = compose()["services"]["worker"]
    assert worker["command"][:4] == ["sdq", "worker", "--gpus", "all"]
    assert worker["environment"]["GPUS"] == "all"
    assert Settings.load({k: str(v) for k, v in worker["environment"].items()}).batch_size is None
    docker_cmd = re.search(r"^CMD (\[.*\])$", (ROOT / "Dockerfile").read_text(), re.M)
    assert docker_cmd and yaml.safe_load(docker_cmd.group(1))[:4] == ["sdq", "worker", "--gpus", "all"]


def fake_gpus(folder: Path, count: int) -> str:
    """A PATH whose `nvidia-smi -L` lists `count` GPUs (and a MIG slice of the first), as on a
    machine that has them."""
    folder.mkdir(parents=True, exist_ok=True)
    listing = "".join(f"GPU {n}: NVIDIA H200 (UUID: GPU-{n:08x})\\n" for n in range(count))
    mig = "  MIG 1g.18gb     Device  0: (UUID: MIG-0)\\n" if count else ""
    script = folder / "nvidia-smi"
    script.write_text(f"#!/bin/sh\n[ \"$1\" = -L ] && printf '{listing}{mig}'\n")
    script.chmod(0o755)
    return f"{folder}{os.pathsep}{os.environ['PATH']}"


def test_gpu_planning_on_a_two_gpu_machine(tmp_path: Path) -> None:
    two = fake_gpus(tmp_path / "two", 2)
    assert plan_gpus("all", {"PATH": two}) == ["0", "1"]
    assert plan_gpus("all", {"PATH": two, "CUDA_VISIBLE_DEVICES": "1"}) == ["1"]  # what it was given
    assert plan_gpus("0,1", {"PATH": two}) == ["0", "1"]
    assert plan_gpus(None, {"PATH": two}) == [None]
    assert plan_gpus("all", {"PATH": fake_gpus(tmp_path / "none", 0)}) == [None]  # the default device
    assert plan_gpus("all", {"PATH": str(tmp_path / "empty")}) == [None]  # no nvidia-smi: no GPU


def worker_healthcheck(env: dict[str, str], gpus: str) -> int:
    """Run the worker service's healthcheck as its container would, on this machine."""
    [kind, script] = compose()["services"]["worker"]["healthcheck"]["test"]
    assert kind == "CMD-SHELL"
    path = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return subprocess.run(["sh", "-c", script], env={**env, "PATH": path, "GPUS": gpus,
                                                     "HOSTNAME": socket.gethostname()},
                          capture_output=True, timeout=120).returncode


def test_the_worker_runs_one_process_per_gpu_and_is_healthy_while_each_beats(
        distributed_env: dict[str, str], tiny_checkpoint: Path, tmp_path: Path) -> None:
    env = {**distributed_env, "PATH": fake_gpus(tmp_path / "two", 2)}
    name = f"gpus-{tmp_path.name[-12:]}"
    worker = WorkerProcess([str(Path(sys.executable).parent / "sdq"), "worker", "--model", str(tiny_checkpoint),
                            "--gpus", "all", "--name", name, "--", "--loglevel", "INFO"],
                           env, env["SDQ_BROKER_URL"], name, tmp_path / "worker.log")
    try:
        wait_for(f"both GPUs' processes to beat (log: {worker.log})", lambda: sorted(
            json.loads(worker.redis.get(key))["gpu"] for key in worker.redis.scan_iter(f"sdq:worker:{name}-gpu*")
        ) == ["0", "1"] or None, timeout=120)
        assert worker_healthcheck(env, "all") == 0 and worker_healthcheck(env, "0,1") == 0
        assert worker_healthcheck({**env, "PATH": fake_gpus(tmp_path / "three", 3)}, "all") != 0
        assert worker_healthcheck(env, "0,1,2") != 0  # one of three GPUs is not serving
        worker.kill_group()
        wait_for("the healthcheck to fail once the worker is gone",
                 lambda: worker_healthcheck(env, "all") != 0, timeout=60, every=1)
    finally:
        worker.stop()
