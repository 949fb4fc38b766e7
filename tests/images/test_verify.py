"""`sdq verify` on files and on items of a SQLite index, through the real `sdq` command group."""
from __future__ import annotations

import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner, Result
from PIL import Image, PngImagePlugin
from sqlalchemy.orm import Session

from sdq.cli.main import cli
from sdq.db.models import Item, Job, Model, Status
from sdq.db.session import open_database
from sdq.images.provenance import encode_png
from sdq.images.storage import LocalStorage, image_key

from .samples import MODEL_SHA256, photo, provenance

MARK = "StableDiffusionV1"


@dataclass
class Home:
    root: Path
    database_url: str
    images: Path

    def run(self, *args: str) -> Result:
        env = {"SDQ_HOME": str(self.root), "SDQ_CONFIG": str(self.root / "none.toml"),
               "SDQ_DATABASE_URL": self.database_url, "SDQ_STORAGE_URL": str(self.images)}
        return CliRunner().invoke(cli, ["verify", *args], env=env)


@pytest.fixture
def home(tmp_path: Path) -> Home:
    return Home(tmp_path, f"sqlite:///{tmp_path / 'sdq.db'}", tmp_path / "images")


def rewrite(data: bytes, edit: Callable[[np.ndarray], np.ndarray] | None = None,
            **chunks: str) -> bytes:
    """Re-save a PNG with some text chunks replaced and/or its pixel array edited."""
    image = Image.open(io.BytesIO(data))
    text = {**image.text, **chunks}  # type: ignore[attr-defined]
    pixels = np.array(image.convert("RGB"))
    if edit:
        pixels = edit(pixels)
    info = PngImagePlugin.PngInfo()
    for key, value in text.items():
        info.add_text(key, value)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG", pnginfo=info, compress_level=9)
    return out.getvalue()


@pytest.fixture(scope="module")
def png() -> bytes:
    return encode_png(photo(512, 512), provenance(), watermark=MARK).data


def write(home: Home, data: bytes, name: str = "image.png") -> str:
    path = home.root / name
    path.write_bytes(data)
    return str(path)


def lines(result: Result, name: str) -> list[str]:
    return [line for line in result.output.splitlines() if f" {name} " in line + " "]


def test_an_untouched_file_verifies(home: Home, png: bytes) -> None:
    result = home.run(write(home, png))
    assert result.exit_code == 0, result.output
    for name in ("sdq chunk", "parameters chunk", "pixels", "size"):
        assert lines(result, name)[0].split()[0] == "ok"
    assert "bits differ" in lines(result, "watermark")[0]
    assert "no database at" in lines(result, "database")[0]
    assert not (home.root / "sdq.db").exists()
    assert result.output.rstrip().endswith("verified: every check passed")


def test_a_file_of_an_earlier_sdq_still_verifies(home: Home) -> None:
    """Before `RNG: CPU` was written, and with `CFG scale: 7.0`: the same content."""
    png = encode_png(photo(512, 512), provenance(cfg=7.0), watermark=MARK).data
    text = Image.open(io.BytesIO(png)).text["parameters"]  # type: ignore[attr-defined]
    older = text.replace("CFG scale: 7,", "CFG scale: 7.0,").replace(" RNG: CPU,", "")
    assert older != text
    result = home.run(write(home, rewrite(png, parameters=older)))
    assert result.exit_code == 0, result.output
    assert lines(result, "parameters chunk")[0].split()[0] == "ok"
    forged = older.replace("CFG scale: 7.0,", "CFG scale: 7.5,")
    assert lines(home.run(write(home, rewrite(png, parameters=forged))),
                 "parameters chunk")[0].split()[0] == "MISMATCH"


def test_a_changed_pixel_is_caught(home: Home, png: bytes) -> None:
    def nudge(pixels: np.ndarray) -> np.ndarray:
        pixels[100, 200, 1] ^= 1
        return pixels
    result = home.run(write(home, rewrite(png, nudge)))
    assert result.exit_code == 1
    assert lines(result, "pixels")[0].split()[0] == "MISMATCH"
    assert lines(result, "parameters chunk")[0].split()[0] == "ok"


def test_a_changed_prompt_in_the_parameters_chunk_is_caught(home: Home, png: bytes) -> None:
    text = Image.open(io.BytesIO(png)).text["parameters"]  # type: ignore[attr-defined]
    forged = text.replace("an astronaut riding a horse", "a horse riding an astronaut")
    result = home.run(write(home, rewrite(png, parameters=forged)))
    assert result.exit_code == 1
    line = lines(result, "parameters chunk")[0]
    assert line.split()[0] == "MISMATCH" and "prompt: file 'a photograph of a horse" in line
    assert lines(result, "pixels")[0].split()[0] == "ok"


def test_a_changed_prompt_in_the_sdq_chunk_is_caught(home: Home, png: bytes) -> None:
    record = json.loads(Image.open(io.BytesIO(png)).text["sdq"])  # type: ignore[attr-defined]
    record["provenance"]["seed"] = 43
    result = home.run(write(home, rewrite(png, sdq=json.dumps(record))))
    assert result.exit_code == 1
    assert "Seed: file '42', sdq chunk '43'" in lines(result, "parameters chunk")[0]


def test_a_missing_watermark_where_one_was_recorded_is_caught(home: Home) -> None:
    unmarked = encode_png(photo(512, 512), provenance(), watermark=None).data
    record = json.loads(Image.open(io.BytesIO(unmarked)).text["sdq"])  # type: ignore[attr-defined]
    record["watermark"] = {"text": MARK, "status": "embedded"}
    result = home.run(write(home, rewrite(unmarked, sdq=json.dumps(record))))
    assert result.exit_code == 1
    assert lines(result, "watermark")[0].split()[0] == "MISMATCH"
    assert lines(result, "pixels")[0].split()[0] == "ok"


def test_json_output(home: Home, png: bytes) -> None:
    result = home.run(write(home, rewrite(png, parameters="cat\nSteps: 1, Seed: 2, Size: 3x4")),
                      "--json")
    assert result.exit_code == 1
    report = json.loads(result.output)
    assert report["ok"] is False and 0 <= report["watermark_ber"] < 0.15
    status = {check["name"]: check["status"] for check in report["checks"]}
    assert status["parameters chunk"] == "mismatch" and status["pixels"] == "ok"
    assert status["database"] == "skipped"


def test_files_without_sdq_provenance(home: Home) -> None:
    buffer = io.BytesIO()
    photo(64, 64).save(buffer, format="PNG")
    result = home.run(write(home, buffer.getvalue()))
    assert result.exit_code == 1 and "missing" in lines(result, "sdq chunk")[0]
    path = write(home, b"not an image", "x.png")
    result = home.run(path)
    assert (result.exit_code, result.output) == (
        2, f"Error: {path}: not a PNG file (nor any other image)\n")
    result = home.run("no-such-file.png")
    assert result.exit_code == 2 and "no such file, and not an item id" in result.output


def store_item(home: Home) -> tuple[int, bytes]:
    """A finished item as a worker leaves it: row, object in storage, sha256 recorded."""
    engine = open_database(home.database_url)
    with Session(engine) as session, session.begin():
        model = Model(sha256=MODEL_SHA256, name="v1-5-pruned-emaonly", architecture="sd1")
        job = Job(name="test")
        session.add_all([model, job])
        session.flush()
        p = provenance(job_id=job.id)
        item = Item(job_id=job.id, row_index=p.row, model=model, **p.params.to_dict())
        session.add(item)
        session.flush()
        encoded = encode_png(photo(512, 512), provenance(job_id=job.id, item_id=item.id),
                             watermark=MARK)
        item.image_key = image_key(job.id, item.id)
        LocalStorage(home.images).put(item.image_key, encoded.data)
        item.image_sha256, item.watermark = encoded.sha256, encoded.watermark
        item.status = Status.DONE
        item_id = item.id
    engine.dispose()
    return item_id, encoded.data


def change_item(home: Home, item_id: int, **values: object) -> None:
    engine = open_database(home.database_url)
    with Session(engine) as session, session.begin():
        item = session.get(Item, item_id)
        for name, value in values.items():
            setattr(item, name, value)
    engine.dispose()


def test_verify_an_item_by_id(home: Home) -> None:
    item_id, _ = store_item(home)
    result = home.run(str(item_id))
    assert result.exit_code == 0, result.output
    assert lines(result, "database sha256")[0].split()[0] == "ok"
    assert f"match item {item_id}" in lines(result, "database parameters")[0]
    change_item(home, item_id, seed=7, watermark=None)
    line = lines(home.run(str(item_id)), "database parameters")[0]
    assert line.split()[0] == "MISMATCH" and "seed: file 42, database 7" in line
    assert "watermark: file 'StableDiffusionV1', database None" in line


def test_a_file_is_checked_against_the_item_it_names(home: Home) -> None:
    item_id, data = store_item(home)
    result = home.run(write(home, data))
    assert result.exit_code == 0, result.output
    assert lines(result, "database sha256")[0].split()[0] == "ok"
    # Same pixels and chunks, other compression: the file differs, the image does not.
    result = home.run(write(home, rewrite(data)))
    assert result.exit_code == 1
    assert lines(result, "database sha256")[0].split()[0] == "MISMATCH"
    assert lines(result, "pixels")[0].split()[0] == "ok"


def test_unknown_items(home: Home) -> None:
    result = home.run("12345")
    assert result.exit_code == 4 and "no database at" in result.output
    item_id, _ = store_item(home)
    result = home.run(str(item_id + 1))
    assert result.exit_code == 3 and f"no item {item_id + 1} in the database" in result.output
    change_item(home, item_id, image_key=None)
    result = home.run(str(item_id))
    assert result.exit_code == 1 and "has no image yet (status: done)" in result.output


def test_a_cropped_image_cannot_still_carry_its_mark(home: Home, png: bytes) -> None:
    result = home.run(write(home, rewrite(png, lambda pixels: pixels[:128, :128])))
    assert result.exit_code == 1
    assert "cannot carry 'StableDiffusionV1'" in lines(result, "watermark")[0]
    assert lines(result, "size")[0].split()[0] == "MISMATCH"


def test_a_decompression_bomb_is_one_line_and_exit_2(home: Home) -> None:
    """A PNG of a few hundred bytes whose header promises 40 000 x 40 000 pixels."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + \
            struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", 40_000, 40_000, 8, 0, 0, 0, 0)
    bomb = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"\0" * 40_001 * 4)) + chunk(b"IEND", b""))
    result = home.run(write(home, bomb, "bomb.png"))
    assert result.exit_code == 2, result.output
    [line] = result.output.strip().splitlines()
    assert line.startswith("Error: ") and "refused to decode" in line
    assert "decompression bomb" in line and "unexpected" not in line
