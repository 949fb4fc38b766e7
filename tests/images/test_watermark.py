"""The dwtDct watermark against invisible-watermark itself (the test-only reference)."""
from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np
import pytest
from imwatermark import WatermarkDecoder, WatermarkEncoder
from PIL import Image

from sdq.images import watermark as wm

from .samples import photo

TEXT = "StableDiffusionV1"


def reference_embed(image: Image.Image, text: str) -> np.ndarray:
    """The reference txt2img script's `put_watermark`: RGB -> BGR, encode, back to RGB."""
    encoder = WatermarkEncoder()
    encoder.set_watermark("bytes", text.encode("utf-8"))
    bgr = cv2.cvtColor(np.array(image), cv2.COLOR_RGB2BGR)
    return cv2.cvtColor(encoder.encode(bgr, "dwtDct"), cv2.COLOR_BGR2RGB)


def reference_bits(image: Image.Image, length: int) -> np.ndarray:
    bgr = cv2.cvtColor(np.array(image), cv2.COLOR_RGB2BGR)
    return np.asarray(WatermarkDecoder("bits", length).decode(bgr, "dwtDct"), dtype=bool)


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def saturated(width: int, height: int, seed: int = 0) -> Image.Image:
    """Pure 0/255 channels: where the package's unclipped cast wraps values around."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.choice(np.array([0, 255], np.uint8), size=(height, width, 3)))


@pytest.mark.parametrize("make", [photo, noise, saturated])
@pytest.mark.parametrize("size", [(512, 512), (768, 512), (264, 520), (256, 256), (1024, 64)])
def test_pixels_equal_the_packages_own_encoding(
        make: Callable[[int, int], Image.Image], size: tuple[int, int]) -> None:
    image = make(*size)
    ours = np.asarray(wm.embed(image, TEXT))
    assert np.array_equal(ours, reference_embed(image, TEXT))


@pytest.mark.parametrize("text", ["sdq", TEXT, "a longer watermark text, 32 bytes"])
def test_decoded_bits_equal_the_packages_decoder(text: str) -> None:
    bits = len(wm.text_bits(text))
    for image in (photo(512, 512), wm.embed(photo(512, 512), text), noise(520, 264)):
        bgr = np.ascontiguousarray(np.asarray(image)[:, :, ::-1])
        assert np.array_equal(wm.decode_bgr(bgr, bits), reference_bits(image, bits))


def test_the_packages_decoder_reads_our_mark() -> None:
    marked = wm.embed(noise(512, 512), TEXT)
    bgr = cv2.cvtColor(np.array(marked), cv2.COLOR_RGB2BGR)
    assert WatermarkDecoder("bytes", 8 * len(TEXT)).decode(bgr, "dwtDct") == TEXT.encode()


def test_bit_error_rate_separates_marked_from_unmarked() -> None:
    images = [photo(512, 512, seed) for seed in range(4)] + [photo(768, 512, 9)]
    marked = [wm.detect_watermark(wm.embed(image, TEXT), TEXT) for image in images]
    unmarked = [wm.detect_watermark(image, TEXT) for image in images]
    assert max(marked) <= 0.15
    assert 0.35 <= min(unmarked) and max(unmarked) <= 0.65
    assert abs(np.mean(unmarked) - 0.5) < 0.06


def test_small_images_are_refused() -> None:
    assert wm.can_watermark(256, 256, TEXT) and wm.can_watermark(1024, 64, TEXT)
    assert not wm.can_watermark(255, 256, TEXT) and not wm.can_watermark(128, 128, TEXT)
    assert not wm.can_watermark(512, 512, "")
    with pytest.raises(ValueError, match="cannot watermark a 128x128 image"):
        wm.embed(photo(128, 128), TEXT)
    with pytest.raises(ValueError):
        wm.detect_watermark(photo(128, 128), TEXT)


def test_yuv_arithmetic_matches_opencv() -> None:
    """Both conversions, on a million random colours plus the corners of the cube (the full
    2**24 were checked once, too slow to repeat in every run)."""
    rng = np.random.default_rng(0)
    corners = np.array([[b, g, r] for b in (0, 255) for g in (0, 255) for r in (0, 255)])
    colours = np.concatenate([corners, rng.integers(0, 256, (2**20, 3))]).astype(np.uint8)
    image = colours.reshape(1, -1, 3)
    assert np.array_equal(wm._bgr_to_yuv(image), cv2.cvtColor(image, cv2.COLOR_BGR2YUV))
    assert np.array_equal(wm._yuv_to_bgr(image), cv2.cvtColor(image, cv2.COLOR_YUV2BGR))
