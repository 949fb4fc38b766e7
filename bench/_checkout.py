"""Run benchmarks from a plain checkout: no `pip install`, no network.

`use_checkout()` puts the repository on `sys.path`, maps the `sdq.*` import names onto the
top-level folders (what `[tool.setuptools.package-dir]` does for an install) when no
installed `sdq` is importable, and adds the wheels found in `.whl/` and `wheels/` at the
repository root (the device notes name the first; either may travel with a run): pure-Python wheels are importable straight from their zip file; wheels with compiled parts
(PyWavelets) are unpacked once into a cache folder first. Standard library only, and nothing
heavy is imported here, so a script can print before torch or diffusers load.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
import types
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WHEEL_FOLDERS = (ROOT / ".whl", ROOT / "wheels")


def _is_pure(wheel: Path) -> bool:
    """A wheel tagged `none-any` holds no compiled extension (zipimport cannot load those)."""
    return wheel.name.endswith("-none-any.whl")


def add_wheels(folder: Path) -> list[str]:
    """Put each wheel of `folder` on `sys.path`; returns the wheel file names."""
    added = []
    cache = Path(os.environ.get("SDQ_WHEEL_CACHE", Path(tempfile.gettempdir()) / "sdq-wheels"))
    for wheel in sorted(folder.glob("*.whl")) if folder.is_dir() else []:
        entry = wheel
        if not _is_pure(wheel):
            entry = cache / wheel.stem
            if not entry.is_dir():
                with zipfile.ZipFile(wheel) as archive:
                    archive.extractall(entry)
        if str(entry) not in sys.path:
            sys.path.append(str(entry))
        added.append(wheel.name)
    return added


def use_checkout(*wheels: Path) -> list[str]:
    """Make `import sdq.*` and the `bench` and `tests` modules work from this checkout; returns
    the wheels added from the folders `wheels` (default: `.whl/` and `wheels/`)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    added = [name for folder in wheels or WHEEL_FOLDERS for name in add_wheels(folder)]
    if "sdq" not in sys.modules and importlib.util.find_spec("sdq") is None:
        package = types.ModuleType("sdq", "sdq, mapped onto a plain checkout by bench/_checkout.py")
        package.__path__ = [str(ROOT)]  # sdq.sdmodel -> ROOT/sdmodel, sdq.db -> ROOT/db, ...
        sys.modules["sdq"] = package
    return added
