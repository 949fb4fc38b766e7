"""The GPU probe, run to its end on exactly the GPU machine's packages plus the carried wheels
(bench/device_venv.py builds them here), so that the one run a GPU session gets loses no phase
to a missing import."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from bench.device_venv import build, carried_wheels
from bench.gpu_probe import PHASES

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def device_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build(tmp_path_factory.mktemp("device") / "venv")


def run_isolated(python: Path, code: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp")}
    return subprocess.run([str(python), "-c", code], capture_output=True, text=True, env=env, cwd=ROOT.parent)


def test_the_environment_holds_the_machine_packages_and_no_others(device_python):
    ok = run_isolated(device_python, "import torch, transformers, safetensors, sqlalchemy, alembic, pywt, diffusers")
    assert ok.returncode == 0, ok.stderr
    for absent in ("redis", "celery", "boto3", "sdq"):
        assert run_isolated(device_python, f"import {absent}").returncode != 0, f"{absent} is not on the machine"
    assert carried_wheels()[0].startswith("diffusers==")


@pytest.mark.slow
def test_the_probe_completes_every_phase_on_the_machine_packages(device_python, tmp_path):
    out = tmp_path / "probe.json"
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), "OMP_NUM_THREADS": "1"}
    subprocess.run([str(device_python), str(ROOT / "bench" / "gpu_probe.py"), "--tiny", "--device", "cpu",
                    "--out", str(out), "--budget", "1100", "--batch-sizes", "1", "2", "--ab-batch", "1",
                    "--compile-tiny", "--compile-backend", "eager"],
                   check=True, cwd=tmp_path, env=env, timeout=1200)
    report = json.loads(out.read_text())
    assert report["probe"]["finished"] and report["probe"]["cut_off"] is None
    phases = report["phases"]
    assert list(phases) == list(PHASES) and PHASES[0] == "sdpa"
    assert {name: p["status"] for name, p in phases.items()} == {name: "done" for name in PHASES}
    for name in ("sdq", "diffusers", "system", "safety", "store", "fast_path", "compile"):
        rows = phases[name]["rows"]
        assert rows and all("error" not in r and r["images_per_s"] > 0 for r in rows), (name, rows)
    sdpa = {r["order"]: r for r in phases["sdpa"]["rows"]}
    assert list(sdpa) == ["fast path", "pytorch", "cudnn", "flash", "efficient", "math"]
    for order in ("fast path", "pytorch", "math"):
        assert sdpa[order]["unet"].startswith("ok") and sdpa[order]["decode"].startswith("ok"), sdpa[order]
    assert sdpa["cudnn"]["unet"].startswith("RuntimeError")  # no cuDNN on a CPU: a row, not a lost run
    assert phases["sdpa"]["guard"] == {"fast_path_order": False, "dropped": None}
    assert [r["batch"] for r in phases["sdq"]["rows"]] == [1, 2]
    assert phases["system"]["rows"][1]["images"] == 4
    compiled = phases["compile"]["rows"]
    assert [r["bucket"] for r in compiled] == [2, 1]
    # One graph per network and bucket: the UNet and the decoder at 2; the UNet alone at 1 (the
    # CPU decodes one image at a time, a shape compiled already).
    assert [(r["graphs"], r["graph_breaks"]) for r in compiled] == [(2, 0), (1, 0)], compiled
    env_phase = phases["environment"]
    assert env_phase["transformers"] == "5.17.0" and env_phase["sqlalchemy"] == "2.1.9", env_phase
