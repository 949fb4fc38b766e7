"""`sdq sheet` and `sdq gallery` from real stored images."""
from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from sdq.jobs.sheet import contact_sheet
from sdq.images.provenance import read_png_metadata

from .conftest import Home


def test_contact_sheet_grid_and_captions() -> None:
    tiles = [(Image.new("RGB", (512, 256), "red"), "#1 seed 5\n" + "word " * 200)] * 5
    sheet = contact_sheet(tiles, columns=2, tile=128)
    assert sheet.size == (256, 3 * (128 + 3 * 15 + 8))  # 3 rows of image + 3 caption lines
    assert sheet.getpixel((64, 64)) == (255, 0, 0)  # a 512x256 image scaled into 128x64
    assert sheet.getpixel((64, 20)) == (255, 255, 255)
    assert sheet.getpixel((200, sheet.height - 10)) == (255, 255, 255)  # the empty sixth cell


def test_sheet_of_a_job_and_of_a_query(home: Home, tmp_path: Path) -> None:
    job = home.add_job(["a red fox", "a blue whale", "a red barn"], done=2)
    out = tmp_path / "sheets" / "job.png"
    result = home.run("sheet", str(job.id), "-o", str(out), "--tile", "64")
    assert result.exit_code == 0, result.output
    assert result.output == f"{out}: 2 image(s), 128x{Image.open(out).height}\n"
    by_query = home.run("sheet", "--query", "red", "-o", str(tmp_path / "q.png"), "--columns", "3")
    assert by_query.exit_code == 0 and "1 image(s), 768x" in by_query.output


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        ([], 2, "give a JOB or --query TEXT, not both or neither"),
        (["1", "--query", "x"], 2, "give a JOB or --query TEXT"),
        (["999"], 3, "Error: no job 999"),
        (["1", "--tile", "8"], 2, "Invalid value for '--tile'"),
    ],
)
def test_sheet_errors(home: Home, tmp_path: Path, args: list[str], code: int, message: str) -> None:
    result = home.run("sheet", *args, "-o", str(tmp_path / "s.png"))
    assert result.exit_code == code and message in result.output


def test_gallery_is_a_static_page_with_escaped_prompts(home: Home, tmp_path: Path) -> None:
    job = home.add_job(['<script>alert("x")</script> a cat', "a dog"], done=2)
    out = tmp_path / "gallery"
    result = home.run("gallery", str(job.id), "-o", str(out))
    assert result.exit_code == 0, result.output
    page = (out / "index.html").read_text()
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert page.count("<figure>") == 2 and "<dt>seed</dt><dd>100</dd>" in page
    for png in out.glob("images/*.png"):
        assert read_png_metadata(png).provenance.item_id == int(png.stem)
        assert f'src="thumbs/{png.stem}.jpg"' in page
        assert Image.open(out / "thumbs" / f"{png.stem}.jpg").size == (64, 64)
    assert len(list(out.glob("images/*.png"))) == 2
