"""`sdq generate` as a user runs it: files written with provenance and watermark, clear errors,
and no diffusers anywhere at run time."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner
from PIL import Image

from sdq.cli.main import cli
from sdq.images.provenance import read_png_metadata
from sdq.images.watermark import detect_watermark


@pytest.fixture
def env(tmp_path) -> dict[str, str]:
    return {"SDQ_HOME": str(tmp_path / "home"), "SDQ_CONFIG": str(tmp_path / "none.toml")}


def run(env, *args: str):
    return CliRunner().invoke(cli, ["generate", *args], env=env, catch_exceptions=False)


def test_writes_pngs_with_provenance_and_watermark(tmp_path, env, tiny_checkpoint):
    out = tmp_path / "out" / "boat.png"
    result = run(env, "a boat, at sea: stormy", "--model", str(tiny_checkpoint), "--negative-prompt", "calm",
                 "--seed", "41", "-n", "2", "--batch-size", "1", "--steps", "2", "--sampler", "euler_a",
                 "--width", "256", "--height", "256", "-o", str(out), "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [entry["seed"] for entry in report["images"]] == [41, 42]
    first = tmp_path / "out" / "boat-0.png"
    meta = read_png_metadata(first)
    assert meta.provenance.params.seed == 41 and meta.provenance.params.sampler == "euler_a"
    assert meta.provenance.model_sha256 == report["model_sha256"]
    assert meta.parameters.prompt == "a boat, at sea: stormy"
    assert meta.parameters.negative_prompt == "calm"
    assert meta.parameters.seed == 41 and meta.parameters.size == (256, 256)
    assert meta.watermark == "StableDiffusionV1"
    assert detect_watermark(Image.open(first), "StableDiffusionV1") < 0.25
    assert (tmp_path / "home" / "hashes.json").is_file()


def test_no_watermark_and_small_images_are_recorded(tmp_path, env, tiny_checkpoint):
    out = tmp_path / "plain.png"
    assert run(env, "x", "--model", str(tiny_checkpoint), "--steps", "1", "--width", "256", "--height", "256",
               "--no-watermark", "-o", str(out)).exit_code == 0
    assert read_png_metadata(out).watermark_status.value == "disabled"
    small = tmp_path / "small.png"
    assert run(env, "x", "--model", str(tiny_checkpoint), "--steps", "1", "--width", "64", "--height", "96",
               "-o", str(small)).exit_code == 0
    meta = read_png_metadata(small)
    assert meta.watermark_status.value == "too_small" and Image.open(small).size == (64, 96)


def test_other_tools_spellings_are_taken_and_sdqs_recorded(tmp_path, env, tiny_checkpoint):
    out = tmp_path / "a.png"
    assert run(env, "x", "--model", str(tiny_checkpoint), "--steps", "1", "--width", "64",
               "--height", "64", "--sampler", "Euler a", "--guidance-scale", "6", "-o", str(out)
               ).exit_code == 0
    meta = read_png_metadata(out)
    assert (meta.provenance.params.sampler, meta.provenance.params.cfg) == ("euler_a", 6.0)
    assert meta.parameters.settings["Sampler"] == "Euler a"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--width", "500"], "must be a multiple of 8"),
        (["--sampler", "heun"], "unknown sampler 'heun'"),
        (["--sampler", "euler", "--eta", "0.3"], "Invalid value for '--eta': applies to ddim only"),
        (["--seed", "4294967296"], "must be between 0 and 4294967295, got 4294967296"),
        (["--cfg", "nan"], "Invalid value for '--cfg' / '--guidance-scale': expected a number, got 'nan'"),
        (["--guidance-scale", "inf"], "expected a number, got 'inf'"),
        (["--eta", "nan"], "Invalid value for '--eta': expected a number, got 'nan'"),
    ],
)
def test_bad_arguments(env, tiny_checkpoint, args, message):
    result = CliRunner().invoke(cli, ["generate", "x", "--model", str(tiny_checkpoint), *args], env=env)
    assert result.exit_code == 2
    assert message in result.output


def test_long_prompt_is_encoded_whole_without_a_warning(tmp_path, env, tiny_checkpoint):
    prompt = "cat " * 74 + "dog, wearing a tiny hat"
    result = run(env, prompt, "--model", str(tiny_checkpoint), "--steps", "1", "--width", "64",
                 "--height", "64", "-o", str(tmp_path / "long.png"))
    assert result.exit_code == 0
    assert "CLIP tokens" not in result.stderr and "Warning" not in result.output


def test_missing_model_is_one_clear_line(env, tmp_path):
    result = CliRunner().invoke(cli, ["generate", "x", "--model", str(tmp_path / "nope.safetensors")], env=env)
    assert result.exit_code == 3
    assert "Error: " in result.output and "no such checkpoint file" in result.output
    assert "Traceback" not in result.output


def test_generation_needs_no_diffusers(tmp_path, env, tiny_checkpoint):
    """diffusers is a test-only reference: block its import and generate anyway."""
    code = ("import sys; sys.modules['diffusers'] = None\n"
            "from sdq.cli.main import cli\n"
            "cli(['generate', 'x', '--model', sys.argv[1], '--steps', '1', '--width', '64', '--height', '64',"
            " '-o', sys.argv[2]], standalone_mode=False)\n"
            "assert sys.modules['diffusers'] is None\n")
    out = tmp_path / "x.png"
    proc = subprocess.run([sys.executable, "-c", code, str(tiny_checkpoint), str(out)],
                          env={**env, "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert out.is_file()
