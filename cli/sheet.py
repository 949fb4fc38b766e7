"""`sdq sheet` (a contact-sheet PNG) and `sdq gallery` (a static HTML page): people would
rather look at a job than read its rows."""
from __future__ import annotations

import html
import io
import math
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click
from PIL import Image, ImageDraw, ImageFont

from sdq.cli.common import (
    F,
    configured_storage,
    database_session,
    item_record,
    limit_option,
    load_settings,
    output_options,
    report,
    safety_label,
    write_file,
)
from sdq.db.models import Status
from sdq.db.queries import get_job, search_items

CAPTION_LINES = 3
GALLERY_THUMB = 256


def _selection(command: F) -> F:
    """JOB, or a prompt query, picks the finished items to show."""
    command = click.option("--query", metavar="TEXT",
                           help="Items whose prompt matches TEXT (as `sdq search`) instead of a job.")(command)
    return click.argument("job_id", metavar="[JOB]", type=int, required=False)(command)


def _load(job_id: int | None, query: str | None, limit: int | None) -> list[tuple[dict[str, Any], bytes]]:
    """The selected done items, in job order (for a job) or newest first, with their PNGs."""
    if (job_id is None) == (query is None):
        raise click.UsageError("give a JOB or --query TEXT, not both or neither")
    settings = load_settings(need_broker=False)
    with database_session(settings) as session:
        if job_id is not None:
            get_job(session, job_id)
        page = search_items(session, job_id=job_id, text=query, status=Status.DONE, limit=limit)
        # A dropped image leaves its item done without one.
        records = [item_record(item) for item in page.items if item.image_key]
    if job_id is not None:
        records.sort(key=lambda r: r["row"])
    if not records:
        raise click.ClickException("no finished images to show")
    storage = configured_storage(settings)
    return [(r, storage.get(r["image_key"])) for r in records]


def _image(data: bytes, name: str) -> Image.Image:
    from sdq.images.imagefile import open_image

    return open_image(data, name).convert("RGB")


def _caption(record: dict[str, Any]) -> str:
    flag = f" FLAGGED ({record['safety_action']})" if record["safety_flagged"] else ""
    return f"#{record['id']} seed {record['seed']} {record['sampler']} {record['steps']} " \
           f"cfg {record['cfg']:g}{flag}\n{record['prompt']}"


def contact_sheet(tiles: Sequence[tuple[Image.Image, str]], *, columns: int, tile: int,
                  font_size: int = 12) -> Image.Image:
    """A grid of images scaled to fit `tile` pixels, each with its caption below (wrapped,
    at most CAPTION_LINES lines), on white, like the reference scripts' grids."""
    font = ImageFont.load_default(font_size)
    line_height = font_size + 3
    chars = max(8, int(tile / (font_size * 0.55)))
    cell_h = tile + CAPTION_LINES * line_height + 8
    rows = math.ceil(len(tiles) / columns)
    sheet = Image.new("RGB", (columns * tile, rows * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    for n, (image, caption) in enumerate(tiles):
        x, y = (n % columns) * tile, (n // columns) * cell_h
        thumb = image.copy()
        thumb.thumbnail((tile, tile))
        sheet.paste(thumb, (x + (tile - thumb.width) // 2, y + (tile - thumb.height) // 2))
        lines = [part for paragraph in caption.split("\n")
                 for part in textwrap.wrap(paragraph, chars) or [""]]
        if len(lines) > CAPTION_LINES:
            lines = lines[:CAPTION_LINES]
            lines[-1] = lines[-1][:chars - 3] + "..."
        for k, line in enumerate(lines):
            draw.text((x + 4, y + tile + 4 + k * line_height), line, fill="black", font=font)
    return sheet


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
    loaded = _load(job_id, query, limit)
    columns = columns or math.ceil(math.sqrt(len(loaded)))
    image = contact_sheet([(_image(data, r["image_key"]), _caption(r)) for r, data in loaded], columns=columns,
                          tile=tile)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    write_file(output, buffer.getvalue())
    report({"file": str(output), "images": len(loaded), "width": image.width,
            "height": image.height},
           f"{output}: {len(loaded)} image(s), {image.width}x{image.height}", printed)


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5rem; background: #fafafa; }}
main {{ display: grid; grid-template-columns: repeat(auto-fill, minmax({thumb}px, 1fr)); gap: 1rem; }}
figure {{ margin: 0; background: white; padding: .5rem; border: 1px solid #ddd; }}
img {{ width: 100%; height: auto; }}
figcaption {{ font-size: .8rem; }} dl {{ display: grid; grid-template-columns: auto 1fr; gap: 0 .5rem; }}
dt {{ color: #666; }} dd {{ margin: 0; overflow-wrap: anywhere; }}
</style></head>
<body><h1>{title}</h1><main>
{figures}
</main></body></html>
"""
_FIELDS = ("prompt", "negative_prompt", "seed", "sampler", "steps", "cfg", "size", "model", "safety",
           "id")


def _figure(record: dict[str, Any]) -> str:
    values = {**record, "size": f"{record['width']}x{record['height']}", "safety": safety_label(record)}
    rows = "".join(f"<dt>{name.replace('_', ' ')}</dt><dd>{html.escape(str(values[name]))}</dd>"
                   for name in _FIELDS if values[name] not in (None, ""))
    name = f"{record['id']}"
    return (f'<figure><a href="images/{name}.png"><img src="thumbs/{name}.jpg" loading="lazy" '
            f'alt="{html.escape(record["prompt"])}"></a><figcaption><dl>{rows}</dl>'
            "</figcaption></figure>")


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
    loaded = _load(job_id, query, limit)
    for record, data in loaded:
        thumb = io.BytesIO()
        small = _image(data, record["image_key"])
        small.thumbnail((GALLERY_THUMB, GALLERY_THUMB))
        small.save(thumb, format="JPEG", quality=85)
        # The stored bytes, not a re-encoding: the PNG keeps its provenance chunks.
        write_file(directory / "images" / f"{record['id']}.png", data)
        write_file(directory / "thumbs" / f"{record['id']}.jpg", thumb.getvalue())
    title = f"sdq job {job_id}" if job_id is not None else f"sdq: {query}"
    page = _PAGE.format(title=html.escape(title), thumb=GALLERY_THUMB,
                        figures="\n".join(_figure(r) for r, _ in loaded))
    write_file(directory / "index.html", page.encode())
    report({"page": str(directory / "index.html"), "images": len(loaded)},
           f"{directory / 'index.html'}: {len(loaded)} image(s)", output)
