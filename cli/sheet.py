"""`sdq sheet` (a contact-sheet PNG) and `sdq gallery` (a static HTML page), over
`sdq.jobs.sheet`."""
from __future__ import annotations

import io
from pathlib import Path

import click

from sdq.cli.common import (
    F,
    configured_storage,
    database_session,
    item_record,
    limit_option,
    load_settings,
    output_options,
    report,
    write_file,
)
from sdq.jobs.sheet import Shown, gallery_files, select_shown, sheet_of


def _selection(command: F) -> F:
    """JOB, or a prompt query, picks the finished items to show."""
    command = click.option("--query", metavar="TEXT",
                           help="Items whose prompt matches TEXT (as `sdq search`) instead of a job.")(command)
    return click.argument("job_id", metavar="[JOB]", type=int, required=False)(command)


def _load(job_id: int | None, query: str | None, limit: int | None) -> list[Shown]:
    if (job_id is None) == (query is None):
        raise click.UsageError("give a JOB or --query TEXT, not both or neither")
    settings = load_settings(need_broker=False)
    with database_session(settings) as session:
        return select_shown(session, configured_storage(settings), item_record, job_id=job_id,
                            query=query, limit=limit)


@click.command()
@_selection
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="PNG file to write.")
@click.option("--columns", type=click.IntRange(1), help="[default: about the square root]")
@click.option("--tile", type=click.IntRange(32, 2048), default=256, show_default=True,
              help="Pixels per image (scaled down to fit).")
@limit_option(64)
@output_options("json", dest="printed")
def sheet(job_id: int | None, query: str | None, output: Path, columns: int | None, tile: int,
          limit: int | None, printed: str | None) -> None:
    """Write a contact sheet: the finished images of JOB (or matching --query) in a grid,
    each captioned with its id, seed, sampler, steps, guidance and prompt.

    \b
    Examples:
      sdq sheet 42 -o job42.png
      sdq sheet --query "red dragon" --columns 8 --tile 192 -o dragons.png
    """
    shown = _load(job_id, query, limit)
    image = sheet_of(shown, columns=columns, tile=tile)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    write_file(output, buffer.getvalue())
    report({"file": str(output), "images": len(shown), "width": image.width,
            "height": image.height},
           f"{output}: {len(shown)} image(s), {image.width}x{image.height}", printed)


@click.command()
@_selection
@click.option("-o", "--output-dir", "directory", required=True,
              type=click.Path(file_okay=False, path_type=Path), help="Folder to write into.")
@limit_option(500)
@output_options("json")
def gallery(job_id: int | None, query: str | None, directory: Path, limit: int | None,
            output: str | None) -> None:
    """Write a static HTML gallery (index.html, thumbnails and the full images, provenance
    included) that any browser opens without a server, with each image's prompt, seed and
    parameters.

    \b
    Examples:
      sdq gallery 42 -o job42/ && open job42/index.html
      sdq gallery --query lighthouse -o lighthouses/
    """
    shown = _load(job_id, query, limit)
    title = f"sdq job {job_id}" if job_id is not None else f"sdq: {query}"
    for name, data in gallery_files(shown, title).items():
        write_file(directory / name, data)
    report({"page": str(directory / "index.html"), "images": len(shown)},
           f"{directory / 'index.html'}: {len(shown)} image(s)", output)
