"""`sdq models`: a registry of models by name and hash, so files and commands can say `sd15`."""
from __future__ import annotations

import json

import click

from sdq.cli.common import database_session, emit, load_settings, output_options, plain, report
from sdq.cli.errors import CommandFailed
from sdq.core.params import short_hash
from sdq.db.models import Model
from sdq.db.queries import all_models, model_item_counts, register_model, remove_model

_COLUMNS = ["name", "hash", "items", "source", "added"]


_FIELDS = ("name", "hash", "sha256", "items", "source", "architecture", "added")
"""The fields of `_record`: the header of `models list --csv`, with models or without."""


def _record(model: Model, items: int) -> dict[str, object]:
    return {"name": model.name, "hash": model.short_hash, "sha256": model.sha256,
            "items": items, "source": model.source_uri, "architecture": model.architecture,
            "added": model.created_at}


@click.group()
def models() -> None:
    """Name models once, then refer to them by name (or hash prefix) everywhere.

    A model is identified by the sha256 of its weights; the name is for people. Prompt
    files can say `model=NAME` per row once the name is registered.

    \b
    Examples:
      sdq models add ~/models/v1-5-pruned-emaonly.safetensors --name sd15
      sdq models list
      sdq models remove sd15
    """


_ADD_USAGE = "sdq models add NAME REF (or sdq models add REF --name NAME)"


def _name_and_ref(given: tuple[str, ...], name: str | None) -> tuple[str, str]:
    """`NAME REF` (the order people try first) or `REF --name NAME`; anything else is a usage
    error that shows both calls."""
    if len(given) == 2 and name is None:
        return given[0], given[1]
    if len(given) == 1 and name is not None:
        return name, given[0]
    raise click.UsageError(f"give a name and a model: {_ADD_USAGE}")


@models.command("add")
@click.argument("given", nargs=-1, metavar="[NAME] REF")
@click.option("--name", help="The name to refer to the model by (or give it before REF).")
@output_options("json")
def add(given: tuple[str, ...], name: str | None, output: str | None) -> None:
    """Register REF (a checkpoint file, a diffusers folder or a Hugging Face repo id in the
    local cache) under NAME. Hashing a large file takes a while the first time only.

    \b
    Examples:
      sdq models add sd15 ~/models/v1-5-pruned-emaonly.safetensors
      sdq models add stable-diffusion-v1-5/stable-diffusion-v1-5 --name sd15
    """
    from sdq.sdmodel.modelfiles import model_sha256, resolve_model_ref

    name, ref = _name_and_ref(given, name)
    settings = load_settings(need_broker=False)
    path = resolve_model_ref(ref)
    try:
        sha256 = model_sha256(path, settings.home / "hashes.json")
    except OSError as exc:
        raise CommandFailed(f"cannot read {path}: {exc.strerror or exc}") from None
    with database_session(settings) as session:
        model = register_model(session, sha256=sha256, name=name, source_uri=str(path))
        session.commit()
        record = _record(model, 0)
    if output == "json":
        click.echo(json.dumps({k: plain(v) for k, v in record.items()}, indent=2))
    else:
        click.echo(f"{name}: {short_hash(sha256)} ({path})")


@models.command("list")
@output_options("json", "csv")
def list_models(output: str | None) -> None:
    """List the known models: registered ones and those that submitted jobs used.

    \b
    Example:
      sdq models list --json
    """
    with database_session() as session:
        counts = model_item_counts(session)
        records = [_record(m, counts.get(m.id, 0)) for m in all_models(session)]
    emit(records, _COLUMNS, output, fields=_FIELDS, empty="no models yet; add one with `sdq models add REF --name NAME`")


@models.command("remove")
@click.argument("name")
@output_options("json")
def remove(name: str, output: str | None) -> None:
    """Forget the model NAME (or hash prefix); refused while items record it.

    \b
    Example:
      sdq models remove sd15-old
    """
    with database_session() as session:
        model = remove_model(session, name)
        record = {"removed": model.name, "sha256": model.sha256}
        removed = f"removed {model.name} ({model.short_hash})"
        session.commit()
    report(record, removed, output)
