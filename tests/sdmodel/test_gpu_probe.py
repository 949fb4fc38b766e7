"""The one-shot GPU probe and the plain-checkout loader it stands on, exercised on the CPU so
that the probe a GPU session runs once has already run here."""
from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from bench.gpu_probe import PHASES

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_probe_reports_every_phase_on_the_cpu(tmp_path):
    out = tmp_path / "probe.json"
    # The budget is the GPU run's; a shared CPU may need more for the tiny run's every phase.
    subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_probe.py"), "--tiny", "--device", "cpu",
                    "--out", str(out), "--budget", "1100"], check=True, cwd=tmp_path, timeout=1200)
    report = json.loads(out.read_text())
    assert report["probe"]["finished"] and report["probe"]["cut_off"] is None
    phases = report["phases"]
    assert set(phases) == set(PHASES)
    assert phases["compile"]["status"] == "skipped"
    for name in set(PHASES) - {"compile"}:
        assert phases[name]["status"] == "done", (name, phases[name])
    for name in ("sdq", "diffusers", "system", "safety", "store", "fast_path"):
        rows = phases[name]["rows"]
        assert rows and all("error" not in r and r["images_per_s"] > 0 for r in rows), (name, rows)
    assert [r["batch"] for r in phases["sdq"]["rows"]] == [1, 2]
    assert {r["variant"] for r in phases["fast_path"]["rows"]} >= {"default", "off", "-device_loop", "+channels_last"}
    assert phases["system"]["rows"][1]["images"] == 4
    assert [r["batch"] for r in phases["safety"]["rows"]] == [1, 2]
    assert phases["ceilings"]["gemm_tflops"] >= 0 and phases["environment"]["device"] == "cpu"


def test_probe_cut_off_by_its_budget_still_reports(tmp_path):
    out = tmp_path / "probe.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_probe.py"), "--tiny", "--device", "cpu",
                           "--out", str(out), "--budget", "1", "--phases", "environment", "sdq"],
                          cwd=tmp_path, timeout=600)
    report = json.loads(out.read_text())
    assert done.returncode == 3
    assert not report["probe"]["finished"] and report["probe"]["cut_off"] in ("environment", "sdq")
    assert report["phases"][report["probe"]["cut_off"]]["status"] == "cut off"


def _wheel(folder: Path, name: str, tag: str) -> None:
    with zipfile.ZipFile(folder / f"{name}-1.0-{tag}.whl", "w") as wheel:
        wheel.writestr(f"{name}/__init__.py", "WHERE = __file__\n")
        wheel.writestr(f"{name}-1.0.dist-info/METADATA", f"Name: {name}\nVersion: 1.0\n")


def test_a_plain_checkout_imports_sdq_and_carried_wheels(tmp_path):
    """In a fresh interpreter without the installed `sdq` (its editable finder left out of the
    import system, as on a machine that never ran `pip install`), the names map onto the
    checkout's folders, and both kinds of wheel import."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _wheel(wheels, "pure_demo", "py3-none-any")
    _wheel(wheels, "binary_demo", "cp312-cp312-manylinux_2_17_x86_64")
    code = f"""
import sys
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
sys.path[:] = [p for p in sys.path if p not in ("", {str(ROOT)!r}) and "__editable__" not in p]
for name in [m for m in sys.modules if m == "sdq" or m.startswith("sdq.")]:
    del sys.modules[name]
sys.path.insert(0, {str(ROOT)!r})
from bench._checkout import use_checkout
from pathlib import Path
added = use_checkout(Path({str(wheels)!r}))
import sdq.sdmodel.fastpath, sdq.db, pure_demo, binary_demo
from importlib import metadata
print(sdq.sdmodel.fastpath.__file__, pure_demo.WHERE, binary_demo.WHERE, metadata.version("pure_demo"), added)
"""
    env = {"PATH": "/usr/bin:/bin", "SDQ_WHEEL_CACHE": str(tmp_path / "cache")}
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                         cwd=tmp_path, env=env).stdout.split()
    assert out[0] == str(ROOT / "sdmodel" / "fastpath.py")
    assert ".whl" in out[1] and str(tmp_path / "cache") in out[2] and out[3] == "1.0"
