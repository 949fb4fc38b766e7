"""Init images in prompt files and --init-dir: what items record, the size an image gives,
and every bad init image or strength refused as `FILE:LINE: field: reason` (or
`DIR/NAME: init_image: reason`) before anything is recorded."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from PIL import Image

from sdq.core.init_image import DEFAULT_STRENGTH
from sdq.core.jobspec import Defaults
from sdq.jobs.inits import InitDirError, InitReader, read_init_dir
from sdq.jobs.promptfile import PromptFileError, parse_prompt_file
from sdq.jobs.templates import Expansion, parse_grid


def save(path: Path, size: tuple[int, int] = (100, 70), mode: str = "RGB", **options) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, *(() if mode in ("1", "I;16") else ((20,) * len(mode),))).save(
        path, **options)
    return path


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def parse(tmp_path: Path, text: str, defaults: Defaults = Defaults(seed=1), **options):
    """The file `p.csv` (or .jsonl by its first character) in tmp_path, its paths read there."""
    name = "p.jsonl" if text.startswith("{") else "p.csv"
    options.setdefault("inits", InitReader(tmp_path))
    return parse_prompt_file(text.encode(), name, defaults, **options)


def errors(tmp_path: Path, text: str, **options) -> list[str]:
    with pytest.raises(PromptFileError) as info:
        parse(tmp_path, text, **options)
    return [str(p) for p in info.value.problems]


def test_a_row_with_an_init_image_records_it_and_takes_its_size(tmp_path: Path) -> None:
    photo = save(tmp_path / "photos" / "harbour.png", (100, 70))
    parsed = parse(tmp_path, "prompt,init_image,strength,n\n"
                             "an oil painting,photos/harbour.png,0.6,2\n"
                             "a sketch,photos/harbour.png,,1\n"
                             "a plain txt2img row,,,1\n")
    items = list(parsed.items)
    assert [(i["init_sha256"], i["init_source"], i["strength"], i["width"], i["height"])
            for i in items[:3]] == [(sha(photo), "photos/harbour.png", 0.6, 96, 64)] * 2 + [
        (sha(photo), "photos/harbour.png", DEFAULT_STRENGTH, 96, 64)]
    assert "init_sha256" not in items[3] and (items[3]["width"], items[3]["height"]) == (512, 512)
    assert [(i.sha256, i.width, i.height, i.size_bytes) for i in parsed.inits] == [
        (sha(photo), 100, 70, photo.stat().st_size)]  # read once, however many rows name it


def test_sizes_given_by_the_row_or_the_job_win_over_the_images_own(tmp_path: Path) -> None:
    save(tmp_path / "a.png", (100, 70))
    by_row = parse(tmp_path, '{"prompt": "x", "init_image": "a.png", "width": 64}\n')
    assert (by_row.items[0]["width"], by_row.items[0]["height"]) == (64, 64)
    by_job = parse(tmp_path, "prompt,init_image\nx,a.png\n",
                   Defaults(seed=1, height=128, strength=0.3))
    assert (by_job.items[0]["width"], by_job.items[0]["height"], by_job.items[0]["strength"]) == (
        96, 128, 0.3)


def test_the_exif_orientation_is_applied_before_the_size_is_taken(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: viewers show it 70 wide, 100 high
    save(tmp_path / "turned.jpg", (100, 70), exif=exif)
    item = parse(tmp_path, "prompt,init_image\nx,turned.jpg\n").items[0]
    assert (item["width"], item["height"]) == (64, 96)


@pytest.mark.parametrize("mode", ["RGBA", "P", "L", "I;16", "CMYK", "1"])
def test_images_of_other_modes_are_taken(tmp_path: Path, mode: str) -> None:
    save(tmp_path / ("a.jpg" if mode == "CMYK" else "a.png"), (64, 64), mode)
    name = "a.jpg" if mode == "CMYK" else "a.png"
    assert parse(tmp_path, f"prompt,init_image\nx,{name}\n").items[0]["init_source"] == name


def test_a_strength_grid_makes_each_image_at_each_strength(tmp_path: Path) -> None:
    save(tmp_path / "a.png", (64, 64))
    parsed = parse(tmp_path, "prompt,init_image,seed\nx,a.png,7\n",
                   expansion=Expansion(grid=parse_grid(["strength=0.3,0.5,0.7"])))
    assert [(i["strength"], i["seed"], i["template_values"]) for i in parsed.items] == [
        (s, 7, {"strength": s}) for s in (0.3, 0.5, 0.7)]


def test_every_bad_init_image_or_strength_is_a_problem_of_its_line(tmp_path: Path) -> None:
    save(tmp_path / "ok.png", (64, 64))
    (tmp_path / "notes.png").write_text("not an image")
    whole = save(tmp_path / "whole.png", (64, 64))
    (tmp_path / "cut.png").write_bytes(whole.read_bytes()[:60])
    save(tmp_path / "bomb.png", (8200, 8200), "1")
    save(tmp_path / "wide.png", (2100, 64))
    save(tmp_path / "tiny.png", (7, 7))
    (tmp_path / "folder.png").mkdir()
    found = errors(tmp_path, "prompt,init_image,strength,steps\n"
                             "a,missing.png,,\n"
                             "b,notes.png,,\n"
                             "c,cut.png,,\n"
                             "d,bomb.png,,\n"
                             "e,ok.png,0,\n"
                             "f,ok.png,1.5,\n"
                             "g,ok.png,nan,\n"
                             "h,ok.png,0.01,50\n"
                             "i,wide.png,,\n"
                             "j,tiny.png,,\n"
                             "k,,0.5,\n"
                             "l,folder.png,,\n")
    assert found[:8] == [
        "p.csv:2: init_image: missing.png: no such file",
        "p.csv:3: init_image: notes.png: not an image file (no format PIL reads)",
        found[2], found[3],
        "p.csv:6: strength: must be above 0 and at most 1, got 0",
        "p.csv:7: strength: must be above 0 and at most 1, got 1.5",
        "p.csv:8: strength: expected a number, got 'nan'",
        "p.csv:9: strength: 0.01 of 50 steps runs no step (int(steps * strength) = 0); raise either",
    ]
    assert found[2].startswith("p.csv:4: init_image: cut.png: truncated or damaged image")
    assert found[3].startswith("p.csv:5: init_image: bomb.png: refused to decode: 8200x8200 is "
                               "67,240,000 pixels, above sdq's cap")
    assert found[8:] == [
        "p.csv:10: init_image: wide.png is 2100x64, so its own width must be between 8 and "
        "2048, got 2096; give width and height",
        "p.csv:11: init_image: tiny.png is 7x7, so its own width must be between 8 and 2048, "
        "got 0; give width and height",
        "p.csv:11: init_image: tiny.png is 7x7, so its own height must be between 8 and 2048, "
        "got 0; give width and height",
        "p.csv:12: strength: applies to image-to-image only: give the row an init_image",
        "p.csv:13: init_image: folder.png: a folder, not an image file",
    ]


def test_a_job_strength_or_strength_grid_without_any_init_image_is_refused(tmp_path: Path
                                                                           ) -> None:
    assert errors(tmp_path, "prompt\nx\n", defaults=Defaults(strength=0.5)) == [
        "p.csv: strength: the job's strength applies to image-to-image only, and no row has "
        "an init_image"]
    assert errors(tmp_path, "prompt\nx\n", expansion=Expansion(
        grid=parse_grid(["strength=0.3,0.6"]))) == [
        "p.csv:2: strength: applies to image-to-image only: give the row an init_image"]


def test_an_init_dir_makes_every_row_once_per_image(tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    for name in ("b.jpg", "a.png"):
        save(folder / name, (64, 64) if name == "a.png" else (80, 64))
    (folder / "README.txt").write_text("about these photos")
    (folder / ".DS_Store").write_bytes(b"\0\0")
    (folder / "sub").mkdir()
    found = read_init_dir(folder)
    assert ([i.source for i in found.images], found.skipped) == (["a.png", "b.jpg"], 3)
    parsed = parse(tmp_path, "prompt,seed\na fox,10\na boat,20\n", starts=found.images)
    assert [(i["prompt"], i["init_source"], i["seed"], i["width"]) for i in parsed.items] == [
        ("a fox", "a.png", 10, 64), ("a fox", "b.jpg", 10, 80),
        ("a boat", "a.png", 20, 64), ("a boat", "b.jpg", 20, 80)]
    assert errors(tmp_path, "prompt,init_image\nx,photos/a.png\n", starts=found.images) == [
        "p.csv:2: init_image: given by --init-dir too; use one or the other"]


def test_a_bad_file_in_an_init_dir_is_named_with_the_folder(tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    save(folder / "a.png", (64, 64))
    (folder / "b.jpg").write_bytes(b"\xff\xd8\xff")
    (folder / "c.png").write_text("a text file")
    with pytest.raises(InitDirError) as info:
        read_init_dir(folder, "photos")
    assert info.value.problems[0].startswith("photos/b.jpg: init_image: ")
    assert info.value.problems[1] == ("photos/c.png: init_image: not an image file (no format "
                                      "PIL reads)")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("")
    with pytest.raises(InitDirError) as info:
        read_init_dir(empty, "empty")
    assert info.value.problems == ["empty: init_image: no image files (names ending in .png, "
                                   ".jpg, .jpeg, .webp, .bmp, .gif, .tif, .tiff)"]


def test_s3_and_item_sources_need_a_storage_and_the_database(tmp_path: Path) -> None:
    assert errors(tmp_path, "prompt,init_image\nx,s3://bucket/a.png\ny,item:7\nz,item:x\n") == [
        "p.csv:2: init_image: s3://bucket/a.png: no storage is configured to read it from",
        "p.csv:3: init_image: item:7: items are not known here",
        "p.csv:4: init_image: item:x: expected item:ID, an item's number"]


def test_a_file_name_that_is_not_utf8_is_recorded_with_its_bytes_escaped(tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    save(folder / os.fsdecode(b"caf\xe9.png"), (64, 64))
    assert [i.source for i in read_init_dir(folder).images] == ["caf\\xe9.png"]
