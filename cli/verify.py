"""`sdq verify`: is this image what sdq says it made?"""
from __future__ import annotations

import json
from pathlib import Path

import click

from sdq.cli.common import configured_storage, load_settings, output_options
from sdq.cli.errors import BAD_INPUT, CommandFailed, Reported
from sdq.core.errors import CheckFailed
from sdq.images.provenance import Check, Verification
from sdq.images.verify import verify_file, verify_item

_LABELS = {True: "ok", False: "MISMATCH", None: "-"}
_STATUS = {True: "ok", False: "mismatch", None: "skipped"}


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
    item, the file's sha256 and parameters are checked against it too; for an image-to-image
    item verified by id, that its init image is still stored as recorded. Exits with status 1
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
            result, skipped = verify_file(path, settings.database_url)
        else:
            result = verify_item(configured_storage(settings), settings.database_url, int(target))
            skipped = None
    except (ValueError, OSError) as exc:
        raise CommandFailed.of(exc, target, code=BAD_INPUT) from None
    _print(target, result, [*result.checks, *([skipped] if skipped else [])], output)
    if not result.ok:
        raise Reported(CheckFailed(f"{target}: verification failed"))
