"""The deployment files, checked without a Docker engine: every sdq command line they run
parses against the real CLI, and every SDQ_* setting they pass is one sdq reads."""
from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

import click
import pytest
import yaml

from sdq.cli.main import cli
from sdq.worker.settings import Settings

ROOT = Path(__file__).parents[2]
SETTINGS = {f"SDQ_{f.name.upper()}" for f in fields(Settings)}


def dotenv() -> dict[str, str]:
    lines = (ROOT / ".env.example").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


def interpolate(text: str, values: dict[str, str]) -> str:
    """Compose's `${NAME}` and `${NAME:-default}`, with .env.example's values."""
    def value(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(3)
        assert name in values or default is not None, f"${{{name}}} is in neither .env.example nor a default"
        return values.get(name, default or "")
    return re.sub(r"\$\{(\w+)(:-([^}]*))?\}", value, text)


def compose() -> dict:
    return yaml.safe_load(interpolate((ROOT / "docker-compose.yml").read_text(), dotenv()))


def sdq_command_lines() -> list[list[str]]:
    services = compose()["services"]
    lines = [s["command"] for s in services.values()
             if isinstance(s.get("command"), list) and s["command"][0] == "sdq"]
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
    assert {line[1] for line in lines} >= {"db", "worker"}
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

