"""Contact sheets (one PNG) and galleries (a static HTML page) of finished images: people
would rather look at a job than read its rows.

Both work on the records the commands print (`describe`, `sdq.cli.common.item_record`) with
the stored PNG of each, so a caption says what `sdq show` says; the gallery keeps the stored
bytes, provenance chunks included. Nothing here writes files: the command writes what it is
given, whole or not at all.
"""
from __future__ import annotations

import html
import io
import math
import textwrap
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from PIL import Image, ImageDraw, ImageFont
from sqlalchemy.orm import Session

from sdq.core.errors import CheckFailed
from sdq.core.jobspec import safety_label
from sdq.core.states import Status
from sdq.db.models import Item
from sdq.db.queries import get_job, search_items
from sdq.images.imagefile import open_image
from sdq.images.storage import Storage

CAPTION_LINES = 3
GALLERY_THUMB = 256
Record = Mapping[str, Any]
Shown = tuple[Record, bytes]


class NothingToShow(CheckFailed):
    """The selection holds no finished image."""


def select_shown(session: Session, storage: Storage, describe: Callable[[Item], Record], *,
                 job_id: int | None, query: str | None, limit: int | None) -> list[Shown]:
    """The done items of the job, in row order, or those matching `query`, newest first,
    each with its stored PNG; NotFound for an unknown job, NothingToShow for no image."""
    if job_id is not None:
        get_job(session, job_id)
    page = search_items(session, job_id=job_id, text=query, status=Status.DONE, limit=limit)
    # A dropped image leaves its item done without one.
    records = [describe(item) for item in page.items if item.image_key]
    if job_id is not None:
        records.sort(key=lambda r: r["row"])
    if not records:
        raise NothingToShow("no finished images to show")
    return [(r, storage.get(r["image_key"])) for r in records]


def _image(data: bytes, name: str) -> Image.Image:
    return open_image(data, name).convert("RGB")


def caption(record: Record) -> str:
    """Id, seed, sampler, steps, guidance and the safety flag, then the prompt."""
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
    for n, (image, text) in enumerate(tiles):
        x, y = (n % columns) * tile, (n // columns) * cell_h
        thumb = image.copy()
        thumb.thumbnail((tile, tile))
        sheet.paste(thumb, (x + (tile - thumb.width) // 2, y + (tile - thumb.height) // 2))
        lines = [part for paragraph in text.split("\n")
                 for part in textwrap.wrap(paragraph, chars) or [""]]
        if len(lines) > CAPTION_LINES:
            lines = lines[:CAPTION_LINES]
            lines[-1] = lines[-1][:chars - 3] + "..."
        for k, line in enumerate(lines):
            draw.text((x + 4, y + tile + 4 + k * line_height), line, fill="black", font=font)
    return sheet


def sheet_of(shown: Sequence[Shown], *, columns: int | None, tile: int) -> Image.Image:
    """The contact sheet of the shown images, captioned; about square unless `columns`."""
    columns = columns or math.ceil(math.sqrt(len(shown)))
    return contact_sheet([(_image(data, r["image_key"]), caption(r)) for r, data in shown], columns=columns,
                         tile=tile)


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


def _figure(record: Record) -> str:
    values = {**record, "size": f"{record['width']}x{record['height']}", "safety": safety_label(record)}
    rows = "".join(f"<dt>{name.replace('_', ' ')}</dt><dd>{html.escape(str(values[name]))}</dd>"
                   for name in _FIELDS if values[name] not in (None, ""))
    name = f"{record['id']}"
    return (f'<figure><a href="images/{name}.png"><img src="thumbs/{name}.jpg" loading="lazy" '
            f'alt="{html.escape(record["prompt"])}"></a><figcaption><dl>{rows}</dl>'
            "</figcaption></figure>")


def gallery_files(shown: Sequence[Shown], title: str) -> dict[str, bytes]:
    """The files of a static gallery, by path in its folder: `index.html`, a JPEG thumbnail
    per image and the stored PNG itself (not a re-encoding: it keeps its provenance chunks)."""
    files: dict[str, bytes] = {}
    for record, data in shown:
        thumb = io.BytesIO()
        small = _image(data, record["image_key"])
        small.thumbnail((GALLERY_THUMB, GALLERY_THUMB))
        small.save(thumb, format="JPEG", quality=85)
        files[f"images/{record['id']}.png"] = data
        files[f"thumbs/{record['id']}.jpg"] = thumb.getvalue()
    page = _PAGE.format(title=html.escape(title), thumb=GALLERY_THUMB,
                        figures="\n".join(_figure(r) for r, _ in shown))
    files["index.html"] = page.encode()
    return files
