"""`sdq config` (the effective settings) and `sdq doctor` (can those settings work?)."""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable

import click

from sdq.cli.common import load_settings, output_options, plain
from sdq.core.settings import Settings, config_file, mask_url

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


@dataclass(frozen=True)
class Finding:
    """One check of `sdq doctor`: what was checked, whether it works, and what to do if not."""

    name: str
    ok: bool
    detail: str
    fix: str | None = None


def _check_database(settings: Settings) -> Finding:
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import SQLAlchemyError

    from sdq.db.session import current_revision, engine_from_url, head_revision

    url = make_url(settings.database_url)
    shown = mask_url(settings.database_url)
    if url.get_backend_name() == "sqlite" and url.database and \
            not Path(url.database).expanduser().exists():
        return Finding("database", True, f"{shown} (created on first use)")
    try:
        engine = engine_from_url(url)
        try:
            current, head = current_revision(engine), head_revision()
        finally:
            engine.dispose()
    except (SQLAlchemyError, ValueError) as exc:
        detail = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        return Finding("database", False, f"{shown}: {detail}",
                       "check SDQ_DATABASE_URL and that the server is up")
    if current == head:
        return Finding("database", True, f"{shown} at schema {head}")
    if url.get_backend_name() == "sqlite":
        return Finding("database", True, f"{shown} at schema {current}, upgraded on first use")
    return Finding("database", False, f"{shown} at schema {current or 'none'}, sdq needs {head}",
                   "run `sdq db upgrade`")


def _check_broker(settings: Settings) -> Finding:
    if settings.broker_url is None:
        return Finding("broker", True, "none: embedded mode, `sdq submit` runs jobs in-process")
    from kombu import Connection

    shown = mask_url(settings.broker_url)
    try:
        with Connection(settings.broker_url, connect_timeout=3,
                        transport_options={"socket_timeout": 3}) as connection:
            connection.ensure_connection(max_retries=0, timeout=3)
    except Exception as exc:  # kombu raises the transport's own errors, of any type
        return Finding("broker", False, f"{shown}: {str(exc).splitlines()[0]}",
                       "start the broker (Redis) or fix SDQ_BROKER_URL")
    return Finding("broker", True, f"{shown} reachable")


def _check_storage(settings: Settings) -> Finding:
    from sdq.images.storage import StorageError, open_storage

    try:
        open_storage(settings.storage_url, max_attempts=1).check()
    except StorageError as exc:
        return Finding("storage", False, str(exc),
                       "fix SDQ_STORAGE_URL (s3://bucket/prefix or a folder) or the AWS settings")
    return Finding("storage", True, f"{settings.storage_url} writable")


def _check_model(settings: Settings) -> Finding:
    from sdq.sdmodel.checkpoint import ModelNotFound, resolve_model_ref

    try:
        path = resolve_model_ref(settings.model)
    except ModelNotFound as exc:
        return Finding("model", False, str(exc).split(". ")[0],
                       "set SDQ_MODEL to a local .safetensors file or diffusers folder, or "
                       "download the repo into the Hugging Face cache while online")
    where = "" if Path(settings.model).expanduser() == path else f" at {path}"
    return Finding("model", True, f"{settings.model}{where}")


CHECKS: tuple[Callable[[Settings], Finding], ...] = (
    _check_database, _check_broker, _check_storage, _check_model)


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
    findings = [check(settings) for check in CHECKS]
    if output == "json":
        click.echo(json.dumps([asdict(f) for f in findings], indent=2))
    else:
        for finding in findings:
            click.echo(f"{'ok' if finding.ok else 'FAIL':<4}  {finding.name:<8}  {finding.detail}")
            if finding.fix:
                click.echo(f"{'':<4}  {'':<8}  fix: {finding.fix}")
    if not all(f.ok for f in findings):
        raise SystemExit(1)
