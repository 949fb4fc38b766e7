"""`sdq generate --init-image --strength` as a user runs it: diffusers' img2img images, the
init image recorded (sha256, name, strength; A1111's `Denoising strength`), clean errors."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from sdq.cli.main import cli
from sdq.images.provenance import read_png_metadata
from sdq.sdmodel.diffusers_reference import reference_pipeline, reference_scheduler

from ..sdmodel.test_img2img import init_image
from .test_generate import env, run  # noqa: F401 - `env` is a fixture


def test_matches_diffusers_and_records_the_init_image(tmp_path, env, tiny_checkpoint):
    """A 70x61 init image, no size given: used at 64x56 as diffusers uses it, and recorded."""
    source = tmp_path / "harbour.png"
    init_image(70, 61, seed=21).save(source)
    out = tmp_path / "out.png"
    result = run(env, "an oil painting of a harbour", "--model", str(tiny_checkpoint),
                 "--negative-prompt", "blurry", "--seed", "5", "-n", "2", "--steps", "10",
                 "--sampler", "dpmpp_2m", "--init-image", str(source), "--strength", "0.6",
                 "-o", str(out), "--json")
    assert result.exit_code == 0, result.output
    sha256 = hashlib.sha256(source.read_bytes()).hexdigest()
    init = {"sha256": sha256, "source": "harbour.png", "strength": 0.6}
    assert json.loads(result.stdout)["init"] == init

    reference = reference_pipeline(tiny_checkpoint, img2img=True)
    reference.scheduler = reference_scheduler("dpmpp_2m")
    expected = reference(
        prompt=["an oil painting of a harbour"] * 2, negative_prompt=["blurry"] * 2,
        image=[Image.open(source).convert("RGB")] * 2, strength=0.6, num_inference_steps=10,
        generator=[torch.Generator("cpu").manual_seed(s) for s in (5, 6)], output_type="np",
    ).images
    for i, path in enumerate([tmp_path / "out-0.png", tmp_path / "out-1.png"]):
        ours = np.asarray(Image.open(path).convert("RGB")).astype(np.int16)
        assert ours.shape == (56, 64, 3)
        assert np.abs(ours - (expected[i] * 255).round()).max() <= 1
        meta = read_png_metadata(path)
        assert meta.provenance.init.to_json() == init
        assert meta.parameters.settings["Denoising strength"] == "0.6"
        assert meta.parameters.size == (64, 56)


def test_size_options_resize_the_init_image(tmp_path, env, tiny_checkpoint):
    source = tmp_path / "wide.png"
    init_image(120, 40, seed=22).save(source)
    out = tmp_path / "out.png"
    assert run(env, "x", "--model", str(tiny_checkpoint), "--steps", "2", "--init-image",
               str(source), "--height", "64", "-o", str(out)).exit_code == 0
    assert Image.open(out).size == (120, 64)
    meta = read_png_metadata(out)
    assert meta.provenance.init.strength == 0.75
    assert meta.parameters.settings["Denoising strength"] == "0.75"
    verified = CliRunner().invoke(cli, ["verify", str(out)], env=env, catch_exceptions=False)
    assert verified.exit_code == 0, verified.output


def test_exif_orientation_is_applied(tmp_path, env, tiny_checkpoint):
    """A camera JPEG stored landscape with `Orientation: 6` is used as viewers show it."""
    source = tmp_path / "camera.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    init_image(96, 64, seed=23).save(source, exif=exif)
    out = tmp_path / "out.png"
    assert run(env, "x", "--model", str(tiny_checkpoint), "--steps", "2", "--init-image",
               str(source), "-o", str(out)).exit_code == 0
    assert Image.open(out).size == (64, 96)


@pytest.mark.parametrize(("args", "message"), [
    (["--strength", "0"], "--strength"), (["--strength", "nan"], "expected a number"),
    (["--strength", "1.5"], "at most 1"), (["--strength", "0.05", "--steps", "10"], "runs no step"),
])
def test_bad_strengths_are_usage_errors(tmp_path, env, tiny_checkpoint, args, message):
    source = tmp_path / "a.png"
    init_image(64, 64, seed=1).save(source)
    result = run(env, "x", "--model", str(tiny_checkpoint), "--init-image", str(source), *args)
    assert result.exit_code == 2 and message in result.output, result.output


def test_bad_init_images_are_usage_errors(tmp_path, env, tiny_checkpoint):
    good = tmp_path / "good.png"
    init_image(64, 64, seed=1).save(good)
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(good.read_bytes()[:300])
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    tiny = tmp_path / "tiny.png"
    Image.new("RGB", (7, 64)).save(tiny)
    cases = [(tmp_path / "missing.png", "missing.png: no such file"),
             (truncated, "cut.png: truncated or damaged image"),
             (text, "notes.png: not an image file"), (tiny, "width")]
    for path, message in cases:
        result = run(env, "x", "--model", str(tiny_checkpoint), "--init-image", str(path))
        assert result.exit_code == 2 and message in result.output, result.output
    result = run(env, "x", "--model", str(tiny_checkpoint), "--strength", "0.5")
    assert result.exit_code == 2 and "give --init-image" in result.output
