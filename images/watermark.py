"""The invisible watermark of the Stable Diffusion reference scripts, without its dependencies.

The reference scripts mark every image with invisible-watermark's `dwtDct` method. That package
pulls OpenCV (which wants libGL on a server) and onnxruntime for an algorithm of a few array
operations, so this module reimplements it with numpy and PyWavelets and keeps the package as a
test-only reference: the tests check that the pixels here equal the package's own encoding and
that its `WatermarkDecoder('bytes', 8 * len(text))` reads them.

What the package does, and what must therefore be reproduced exactly:
- the image (BGR, uint8) goes to OpenCV's 8-bit YUV, computed in 14-bit fixed point;
- only the U plane carries the mark: one-level Haar DWT of its top-left `(h//4*4, w//4*4)`
  part, then in every 4x4 block of the approximation band (row-major, bit `n % len(bits)` for
  block `n`) the largest-magnitude sample other than the block's first one is quantised to
  `(|v| // 36 + 0.25 + 0.5 * bit) * 36`, sign kept;
- the inverse DWT is fed the detail bands as (cV, cH, cD) although the forward one returned
  (cH, cV, cD) -- a quirk of the package that changes pixels, kept for parity -- and its float
  result is stored into the uint8 plane by numpy's plain cast (truncation, no clipping);
- decoding reads `|v| % 36 > 18` per block and takes the majority per bit.
Despite the method's name no DCT is involved (the package's DCT code serves its other
methods), so neither OpenCV nor scipy is needed. The YUV arithmetic was checked against
cv2.cvtColor on all 2**24 colours, both ways.

The method is fragile by design (a few of 136 bits flip even on a clean image), so detection
reports a bit-error rate rather than a yes/no.
"""
from __future__ import annotations

import numpy as np
import pywt
from PIL import Image

SCALE = 36.0
BLOCK = 4
MIN_PIXELS = 256 * 256
"""The package refuses images with fewer pixels than this (its `r*c < 256*256` check)."""

_SHIFT = 14
_HALF = 1 << (_SHIFT - 1)
# OpenCV's BT.601 YUV coefficients scaled by 2**14 (color_yuv.simd.hpp), so that the 8-bit
# conversions match cv2.cvtColor bit for bit.
_R2Y, _G2Y, _B2Y, _B2U, _R2V = 4899, 9617, 1868, 8061, 14369
_U2B, _U2G, _V2G, _V2R = 33292, -6472, -9519, 18678


def text_bits(text: str) -> np.ndarray:
    """The payload as the package builds it from `text.encode('utf-8')`: MSB-first bits."""
    return np.unpackbits(np.frombuffer(text.encode("utf-8"), dtype=np.uint8))


def can_watermark(width: int, height: int, text: str) -> bool:
    """True when the package accepts the size and every payload bit lands in at least one block."""
    blocks = (height // BLOCK * BLOCK // 2 // BLOCK) * (width // BLOCK * BLOCK // 2 // BLOCK)
    return width * height >= MIN_PIXELS and blocks >= len(text_bits(text)) > 0


def _descale(x: np.ndarray) -> np.ndarray:
    return (x + _HALF) >> _SHIFT


def _bgr_to_yuv(bgr: np.ndarray) -> np.ndarray:
    b, g, r = (bgr[..., i].astype(np.int32) for i in range(3))
    y = _descale(r * _R2Y + g * _G2Y + b * _B2Y)
    u = _descale((b - y) * _B2U + (128 << _SHIFT))
    v = _descale((r - y) * _R2V + (128 << _SHIFT))
    return np.clip(np.stack([y, u, v], axis=-1), 0, 255).astype(np.uint8)


def _yuv_to_bgr(yuv: np.ndarray) -> np.ndarray:
    y, u, v = (yuv[..., i].astype(np.int32) for i in range(3))
    u, v = u - 128, v - 128
    b = y + _descale(u * _U2B)
    g = y + _descale(u * _U2G + v * _V2G)
    r = y + _descale(v * _V2R)
    return np.clip(np.stack([b, g, r], axis=-1), 0, 255).astype(np.uint8)


def _blocks(band: np.ndarray) -> np.ndarray:
    """The band's whole 4x4 blocks, copied out as (blocks in row-major order, 16)."""
    rows, cols = band.shape[0] // BLOCK, band.shape[1] // BLOCK
    tiles = band[: rows * BLOCK, : cols * BLOCK].reshape(rows, BLOCK, cols, BLOCK)
    return tiles.transpose(0, 2, 1, 3).reshape(rows * cols, BLOCK * BLOCK)


def _peaks(blocks: np.ndarray) -> np.ndarray:
    """Index of each block's largest |sample| after the first (the first wins ties, as argmax)."""
    return np.argmax(np.abs(blocks[:, 1:]), axis=1) + 1


def _marked_region(shape: tuple[int, ...]) -> tuple[slice, slice]:
    return slice(0, shape[0] // BLOCK * BLOCK), slice(0, shape[1] // BLOCK * BLOCK)


def embed_bgr(bgr: np.ndarray, bits: np.ndarray) -> np.ndarray:
    """`WatermarkEncoder.encode(bgr, 'dwtDct')` for an (H, W, 3) uint8 BGR array."""
    yuv = _bgr_to_yuv(bgr)
    region = _marked_region(yuv.shape)
    approx, (horizontal, vertical, diagonal) = pywt.dwt2(yuv[region + (1,)], "haar")
    blocks = _blocks(approx)
    rows = np.arange(len(blocks))
    cols = _peaks(blocks)
    wanted = bits[rows % len(bits)]
    value = blocks[rows, cols]
    magnitude = (np.abs(value) // SCALE + 0.25 + 0.5 * wanted) * SCALE
    blocks[rows, cols] = np.where(value >= 0.0, magnitude, -1.0 * magnitude)
    _write_blocks(approx, blocks)
    yuv[region + (1,)] = pywt.idwt2((approx, (vertical, horizontal, diagonal)), "haar")
    return _yuv_to_bgr(yuv)


def _write_blocks(band: np.ndarray, blocks: np.ndarray) -> None:
    rows, cols = band.shape[0] // BLOCK, band.shape[1] // BLOCK
    tiles = blocks.reshape(rows, cols, BLOCK, BLOCK).transpose(0, 2, 1, 3)
    band[: rows * BLOCK, : cols * BLOCK] = tiles.reshape(rows * BLOCK, cols * BLOCK)


def decode_bgr(bgr: np.ndarray, length: int) -> np.ndarray:
    """`WatermarkDecoder('bits', length).decode(bgr, 'dwtDct')`: the majority bit per position."""
    yuv = _bgr_to_yuv(bgr)
    approx, _ = pywt.dwt2(yuv[_marked_region(yuv.shape) + (1,)], "haar")
    blocks = _blocks(approx)
    votes = np.abs(blocks[np.arange(len(blocks)), _peaks(blocks)]) % SCALE > 0.5 * SCALE
    position = np.arange(len(blocks)) % length
    ones = np.bincount(position, weights=votes, minlength=length)
    seen = np.bincount(position, minlength=length)
    with np.errstate(invalid="ignore", divide="ignore"):
        return ones / seen * 255 > 127


def _bgr(image: Image.Image) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1])


def embed(image: Image.Image, text: str) -> Image.Image:
    """Mark an RGB image as the reference txt2img script does (RGB -> BGR -> encode -> RGB)."""
    if not can_watermark(image.width, image.height, text):
        raise ValueError(
            f"cannot watermark a {image.width}x{image.height} image with {text!r}: "
            f"it needs at least {MIN_PIXELS} pixels and one 8x8 area per payload bit"
        )
    marked = embed_bgr(_bgr(image), text_bits(text))
    return Image.fromarray(np.ascontiguousarray(marked[:, :, ::-1]))


def detect_watermark(image: Image.Image, text: str) -> float:
    """Fraction of the payload bits of `text` that the decoder reads wrong in `image`.

    A marked image straight out of sdq gives a few percent; an unmarked one about 50%.
    """
    if not can_watermark(image.width, image.height, text):
        raise ValueError(f"a {image.width}x{image.height} image cannot carry {text!r}")
    expected = text_bits(text).astype(bool)
    return float(np.mean(decode_bgr(_bgr(image), len(expected)) != expected))
