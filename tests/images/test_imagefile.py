"""Opening image files: init images made RGB exactly as diffusers' `load_image` makes them,
and every file sdq cannot or will not decode refused with its name."""
from __future__ import annotations

import hashlib
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from sdq.images.imagefile import ImageFileError, open_image, read_init_image


def photo(width: int = 48, height: int = 32) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def i16() -> Image.Image:
    values = np.linspace(0, 65535, 48 * 32).reshape(32, 48).astype(np.uint16)
    return Image.fromarray(values)


def paletted_with_transparency() -> Image.Image:
    image = photo().convert("P")
    image.info["transparency"] = 0
    return image


@pytest.mark.parametrize(("mode", "make", "suffix"), [
    ("RGBA", lambda: photo().convert("RGBA"), "png"), ("LA", lambda: photo().convert("LA"), "png"),
    ("P", paletted_with_transparency, "png"), ("L", lambda: photo().convert("L"), "png"),
    ("I;16", i16, "png"), ("CMYK", lambda: photo().convert("CMYK"), "jpg"),
    ("RGB", photo, "webp"),
])
def test_modes_are_converted_as_diffusers_load_image_converts_them(tmp_path, mode, make, suffix):
    from diffusers.utils import load_image

    path = tmp_path / f"init.{suffix}"
    make().save(path, **({"lossless": True} if suffix == "webp" else {}))
    read = read_init_image(path)
    assert Image.open(path).mode == mode and read.image.mode == "RGB"
    assert np.array_equal(np.asarray(read.image), np.asarray(load_image(str(path))))
    assert read.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert read.source == f"init.{suffix}"


def test_i16_is_clipped_not_scaled(tmp_path):
    """What PIL's conversion (and so diffusers) does, as docs/img2img.md warns."""
    path = tmp_path / "depth.png"
    i16().save(path)
    values = np.asarray(read_init_image(path).image)[..., 0]
    assert values.max() == 255 and (values == 255).mean() > 0.9


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_is_applied_as_diffusers_does(tmp_path, orientation):
    from diffusers.utils import load_image

    path = tmp_path / "camera.jpg"
    exif = Image.Exif()
    exif[0x0112] = orientation
    photo().save(path, exif=exif)
    image = read_init_image(path).image
    assert image.size == ((48, 32) if orientation == 3 else (32, 48))
    assert np.array_equal(np.asarray(image), np.asarray(load_image(str(path))))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims a size in its header and holds next to nothing."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def test_decompression_bombs_are_refused_before_decoding():
    with pytest.raises(ImageFileError, match="bomb.png: refused to decode"):
        open_image(png_header_only(40_000, 40_000), "bomb.png")
    with pytest.raises(ImageFileError, match=r"refused to decode: 9000x9000 is 81,000,000 pixels, "
                                             r"above sdq's cap of 67,108,864"):
        open_image(png_header_only(9000, 9000), "big.png")
    with pytest.raises(ImageFileError, match="above sdq's cap of 100"):
        open_image(png_header_only(20, 20), "small.png", max_pixels=100)


def test_unreadable_files_are_refused_with_their_name(tmp_path):
    good = tmp_path / "good.png"
    photo().save(good)
    (tmp_path / "cut.png").write_bytes(good.read_bytes()[:200])
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "folder.png").mkdir()
    for name, reason in [("cut.png", "truncated or damaged image"),
                         ("notes.txt", "not an image file"), ("missing.png", "no such file"),
                         ("folder.png", "a folder, not an image file")]:
        with pytest.raises(ImageFileError, match=f"^{tmp_path / name}: {reason}"):
            read_init_image(tmp_path / name)
    assert open_image(good).size == (48, 32)
