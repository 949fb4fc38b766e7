"""`sdq config` (the effective settings) and `sdq doctor` (can those settings work?)."""
from __future__ import annotations

import json
import os
from dataclasses import asdict, fields
from typing import Any

import click

from sdq.cli.common import load_settings, output_options, plain
from sdq.cli.errors import Reported
from sdq.core.errors import CheckFailed
from sdq.core.settings import Settings, config_file, mask_url
from sdq.jobs.doctor import diagnose

_AWS_SHOWN = ("AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE")


def _settings_record(settings: Settings) -> dict[str, Any]:
    record: dict[str, Any] = {"mode": "embedded" if settings.embedded else "distributed"}
    for field in fields(settings):
        value = getattr(settings, field.name)
        record[field.name] = mask_url(value) if field.name.endswith("_url") else plain(value)
    record["home"] = str(settings.home)
    if settings.storage_url.startswith("s3://"):
        record.update({name.lower(): os.environ.get(name) for name in _AWS_SHOWN})
        record["aws_credentials"] = "from the environment" if os.environ.get(
            "AWS_ACCESS_KEY_ID") else "from boto3's default chain (profile, instance role)"
    return record


@click.group(invoke_without_command=True)
@output_options("json")
@click.pass_context
def config(ctx: click.Context, output: str | None) -> None:
    """Show the effective settings (SDQ_* variables over the config file) and the mode.

    Embedded mode (no SDQ_BROKER_URL) runs jobs in-process; distributed mode enqueues them
    for `sdq worker`. Passwords and secret-looking URL parameters are shown as ***.

    \b
    Examples:
      sdq config
      SDQ_BROKER_URL=redis://queue.internal:6379/0 sdq config --json
      sdq config path images        (where the images are: see `sdq config path --help`)
    """
    if ctx.invoked_subcommand is None:
        _print_record(_settings_record(load_settings(need_broker=False)), output)


def _print_record(record: dict[str, Any], output: str | None) -> None:
    if output == "json":
        click.echo(json.dumps(record, indent=2))
        return
    width = max(map(len, record))
    for key, value in record.items():
        click.echo(f"{key:<{width}}  {'(not set)' if value is None else value}")


def paths(settings: Settings) -> dict[str, str]:
    """Where sdq reads and writes: the config file, the home folder, the database (its file
    for SQLite, else the URL, password masked) and the images (a folder or an S3 URL)."""
    database = settings.database_url
    if database.startswith("sqlite:///"):
        database = database.removeprefix("sqlite:///")
    return {"config": str(config_file()), "home": str(settings.home),
            "database": mask_url(database) or database, "images": settings.storage_url}


@config.command("path")
@click.argument("name", required=False, type=click.Choice(["config", "home", "database", "images"]))
@output_options("json")
def path(name: str | None, output: str | None) -> None:
    """Print where sdq keeps things: the config file, the home folder, the database and the
    images; with NAME, that one path alone, for scripts.

    \b
    Examples:
      sdq config path
      sqlite-utils tables "$(sdq config path database)"
      ls "$(sdq config path images)"
    """
    found = paths(load_settings(need_broker=False))
    if name is None:
        _print_record(found, output)
    elif output == "json":
        click.echo(json.dumps({name: found[name]}))
    else:
        click.echo(found[name])


@click.command()
@output_options("json")
def doctor(output: str | None) -> None:
    """Check that the database, broker, storage and default model can be reached, and say
    what to fix when one cannot. Exits with status 1 if any check fails.

    \b
    Examples:
      sdq doctor
      SDQ_BROKER_URL=redis://queue.internal:6379/0 sdq doctor --json
    """
    settings = load_settings(need_broker=False)
    findings = diagnose(settings)
    if output == "json":
        click.echo(json.dumps([asdict(f) for f in findings], indent=2))
    else:
        for finding in findings:
            click.echo(f"{'ok' if finding.ok else 'FAIL':<4}  {finding.name:<8}  {finding.detail}")
            if finding.fix:
                click.echo(f"{'':<4}  {'':<8}  fix: {finding.fix}")
    if failed := [f.name for f in findings if not f.ok]:
        raise Reported(CheckFailed(f"doctor: {', '.join(failed)} failed"))
