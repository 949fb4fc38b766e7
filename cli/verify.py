"""`sdq verify`: is this image what sdq says it made?"""
from __future__ import annotations

import json
from pathlib import Path

import click
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from sdq.cli.common import configured_storage, load_settings, output_options
from sdq.cli.errors import BAD_INPUT, CommandFailed
from sdq.core.errors import NotFound, Unavailable
from sdq.core.settings import Settings
from sdq.db.models import Item
from sdq.db.session import SchemaMismatch, open_database
from sdq.images.provenance import (
    Check,
    ItemRecord,
    Verification,
    read_png_metadata,
    verify_png,
)

_LABELS = {True: "ok", False: "MISMATCH", None: "-"}
_STATUS = {True: "ok", False: "mismatch", None: "skipped"}


class _Unavailable(Exception):
    """The database cannot answer; a file is still verified on its own."""


def _find_item(database_url: str, item_id: int) -> tuple[ItemRecord, str | None, str] | None:
    """(record, image key, status), or None when the database has no such item.

    A SQLite file that does not exist is not created: verifying a downloaded image on a
    machine that never ran sdq must leave no database behind.
    """
    url = make_url(database_url)
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:" \
            and not Path(url.database).expanduser().is_file():
        raise _Unavailable(f"no database at {url.database}")
    try:
        engine = open_database(url)
    except (SQLAlchemyError, SchemaMismatch, ValueError) as exc:
        raise _Unavailable(str(exc).splitlines()[0]) from None
    try:
        with Session(engine) as session:
            item = session.get(Item, item_id)
            if item is None:
                return None
            status = item.status.value
            if item.safety_action == "dropped":
                status += ", image dropped by the safety checker"
            return ItemRecord.of(item), item.image_key, status
    except SQLAlchemyError as exc:
        raise _Unavailable(str(exc).splitlines()[0]) from None
    finally:
        engine.dispose()


def _verify_file(path: Path, database_url: str) -> tuple[Verification, Check | None]:
    """Verify a file, against the database when it knows the item the file names."""
    data = path.read_bytes()
    provenance = read_png_metadata(data).provenance
    if provenance is None or provenance.item_id is None:
        return verify_png(data), Check("database", None, "the file names no item")
    try:
        found = _find_item(database_url, provenance.item_id)
    except _Unavailable as exc:
        return verify_png(data), Check("database", None, str(exc))
    if found is None:
        return verify_png(data), Check("database", None,
                                       f"the database has no item {provenance.item_id}")
    return verify_png(data, found[0]), None


def _verify_item(settings: Settings, item_id: int) -> Verification:
    try:
        found = _find_item(settings.database_url, item_id)
    except _Unavailable as exc:
        raise Unavailable(f"item {item_id}: {exc}") from None
    if found is None:
        raise NotFound(f"no item {item_id} in the database")
    record, key, status = found
    if key is None:
        raise CommandFailed(f"item {item_id} has no image yet (status: {status})")
    return verify_png(configured_storage(settings).get(key), record)


def _print(target: str, result: Verification, checks: list[Check], output: str | None) -> None:
    if output == "json":
        click.echo(json.dumps({
            "target": target, "sha256": result.metadata.sha256, "ok": result.ok,
            "watermark_ber": result.watermark_ber,
            "checks": [{"name": c.name, "status": _STATUS[c.ok], "detail": c.detail}
                       for c in checks],
        }, indent=2))
        return
    click.echo(f"{target} (sha256 {result.metadata.sha256[:16]}...)")
    width = max(len(c.name) for c in checks)
    for check in checks:
        click.echo(f"  {_LABELS[check.ok]:<8} {check.name:<{width}}  {check.detail}")
    failed = sum(check.ok is False for check in checks)
    click.echo("verified: every check passed" if not failed
               else f"verification failed: {failed} mismatch{'es' if failed > 1 else ''}")


@click.command("verify")
@click.argument("target")
@output_options("json")
def verify(target: str, output: str | None) -> None:
    """Check an image's provenance chunks, pixels and watermark, and its database record.

    TARGET is a PNG file (from anywhere) or an item id. The file is checked against itself:
    the A1111 `parameters` text must agree with the sdq JSON chunk, the pixels must match the
    recorded digest and the recorded watermark must read back. When the database knows the
    item, the file's sha256 and parameters are checked against it too. Exits with status 1
    on any mismatch.

    \b
    Examples:
      sdq verify 1234
      sdq verify ~/Downloads/1234.png --json
    """
    settings = load_settings(need_broker=False)
    path = Path(target).expanduser()
    if not path.is_file() and not target.isdigit():
        raise CommandFailed(f"{target}: no such file, and not an item id", BAD_INPUT)
    try:
        if path.is_file():
            result, skipped = _verify_file(path, settings.database_url)
        else:
            result, skipped = _verify_item(settings, int(target)), None
    except (ValueError, OSError) as exc:
        raise CommandFailed.of(exc, target, code=BAD_INPUT) from None
    _print(target, result, [*result.checks, *([skipped] if skipped else [])], output)
    if not result.ok:
        raise SystemExit(1)
