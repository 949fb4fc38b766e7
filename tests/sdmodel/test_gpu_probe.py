"""The one-shot GPU probe's budget and the plain-checkout loader it stands on; the probe's every
phase runs on the machine's packages in tests/bench/test_device_venv.py."""
from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


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


def test_a_checkout_carries_wheels_in_either_folder(tmp_path):
    """`.whl/` (the device notes' name) and `wheels/` are both read from the checkout's root."""
    checkout = tmp_path / "checkout"
    (checkout / "bench").mkdir(parents=True)
    (checkout / "bench" / "_checkout.py").write_text((ROOT / "bench" / "_checkout.py").read_text())
    for folder, name in ((".whl", "dot_demo"), ("wheels", "plain_demo")):
        (checkout / folder).mkdir()
        _wheel(checkout / folder, name, "py3-none-any")
    code = "from bench._checkout import use_checkout; print(*use_checkout()); import dot_demo, plain_demo"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                         cwd=checkout).stdout.split()
    assert out == ["dot_demo-1.0-py3-none-any.whl", "plain_demo-1.0-py3-none-any.whl"]
