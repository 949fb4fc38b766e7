"""Opening image files: the one place sdq decodes an image it did not just make.

Stored PNGs (verify, reproduce, sheets) and init images (img2img) all come through
`open_image`, so one pixel cap stops decompression bombs everywhere (a few kilobytes that would
decode to gigabytes) and every unreadable file fails the same way: `InvalidInput` naming it.

Init images are then made RGB the way diffusers' `load_image` makes them, since that is the
pipeline sdq matches: the EXIF orientation applied first (`ImageOps.exif_transpose`, so the
image is used the way viewers show it), then PIL's `convert("RGB")`: alpha (RGBA, LA, a
palette's transparency) is dropped, not composited; L is repeated into three channels; CMYK
goes through PIL's plain formula, without colour profiles; 16-bit grayscale (I;16) is clipped
at 255, not scaled.
"""
from __future__ import annotations

import hashlib
import io
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

from PIL import Image, ImageOps, UnidentifiedImageError

from sdq.core.errors import InvalidInput

MAX_PIXELS = 8192 * 8192
"""The most pixels sdq decodes in one image (64 Mpx): sixteen times the largest image it
makes (2048x2048), room for a camera photo to be resized down, and under PIL's own bomb
threshold, whose warning therefore never fires on an image sdq accepts."""


T = TypeVar("T")


class ImageFileError(InvalidInput):
    """An image file sdq cannot or will not decode: `NAME: reason`."""

    def __init__(self, label: str, reason: str) -> None:
        self.label, self.reason = label, reason
        super().__init__(f"{label}: {reason}")


def open_image(source: Path | bytes, name: str | None = None, *,
               max_pixels: int = MAX_PIXELS) -> Image.Image:
    """The decoded image of a file or of bytes (`name` names them in errors), fully loaded, so
    a truncated file fails here and not later. Its size is checked from the header before a
    pixel is decoded: above `max_pixels` it is refused."""
    label = name or str(source)
    data = source if isinstance(source, bytes) else read_file(Path(source), label)
    image = _decode(lambda: Image.open(io.BytesIO(data)), label)
    pixels = image.width * image.height
    if pixels > max_pixels:
        raise ImageFileError(label, f"refused to decode: {image.width}x{image.height} is "
                                    f"{pixels:,} pixels, above sdq's cap of {max_pixels:,} "
                                    f"(a decompression bomb, or far larger than SD needs)")
    _decode(image.load, label)
    return image


def _decode(step: Callable[[], T], label: str) -> T:
    """One step of decoding, PIL's failures turned into `ImageFileError` naming the file."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return step()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageFileError(label, f"refused to decode: {exc}") from None
    except UnidentifiedImageError:
        raise ImageFileError(label, "not an image file (no format PIL reads)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        # PIL names its in-memory buffer (`<_io.BytesIO object at 0x...>`): meaningless here.
        said = re.sub(r" ?<_io\.BytesIO object at 0x[0-9a-f]+>", "", str(exc))
        raise ImageFileError(label, f"truncated or damaged image: {said}") from None


def read_file(path: Path, label: str) -> bytes:
    """A file's bytes, or ImageFileError naming it as `label` (missing, a folder, unreadable)."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ImageFileError(label, "no such file") from None
    except IsADirectoryError:
        raise ImageFileError(label, "a folder, not an image file") from None
    except OSError as exc:
        raise ImageFileError(label, f"cannot read: {exc.strerror or exc}") from None


def init_rgb(image: Image.Image, label: str) -> Image.Image:
    """An init image as diffusers' `load_image` makes it: EXIF orientation applied, then RGB
    (see the module's docstring for what each mode becomes); ImageFileError naming `label`
    for a mode PIL cannot convert, so submit, `generate` and workers refuse it alike."""
    try:
        return ImageOps.exif_transpose(image).convert("RGB")
    except (OSError, ValueError) as exc:
        raise ImageFileError(label, f"cannot be made RGB: {exc}") from None


@dataclass(frozen=True)
class InitFile:
    """An init image read for img2img: RGB pixels, the sha256 of the file's bytes (what names
    it in records), and the name it was given."""

    image: Image.Image
    sha256: str
    source: str


def read_init_image(path: Path | str) -> InitFile:
    """An init image file, checked (`open_image`) and made RGB (`init_rgb`); the sha256 is of
    the bytes decoded, read once."""
    path = Path(path)
    data = read_file(path, str(path))
    return InitFile(init_rgb(open_image(data, str(path)), str(path)),
                    hashlib.sha256(data).hexdigest(), path.name)
