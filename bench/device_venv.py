"""A virtual environment holding only what the GPU machine holds, plus the carried wheels.

The GPU machine runs its own Python packages (bench/device-packages.txt) and whatever a session
carries (bench/device-wheels.txt); a package sdq imports beyond those fails there, in a run
that cannot be repeated cheaply. This builds that package set here, in seconds:
`python -m venv --without-pip`, then each listed distribution installed in this interpreter's
environment is linked in by its top-level entries (its RECORD). A listed `name==version` whose
version is not the one installed here is installed with `pip install --no-deps --target`
(from pip's cache after the first time). sdq itself is not installed: the probe maps it onto
the checkout, as on the machine.

    python -m bench.device_venv /tmp/device-venv      (then /tmp/device-venv/bin/python ...)
"""
from __future__ import annotations

import re
import subprocess
import sys
import sysconfig
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ROOT / "bench" / "device-packages.txt"
WHEELS = ROOT / "bench" / "device-wheels.txt"


def canonical(name: str) -> str:
    """A distribution name as package indexes compare them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements(path: Path) -> dict[str, str | None]:
    """A list file's `name` / `name==version` lines as {canonical name: version or None}."""
    wanted: dict[str, str | None] = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.strip().partition("==")
            wanted[canonical(name)] = version or None
    return wanted


def carried_wheels(path: Path = WHEELS) -> list[str]:
    """bench/device-wheels.txt's `name==version` lines, each checked to pin a version."""
    wanted = requirements(path)
    if unpinned := [name for name, version in wanted.items() if version is None]:
        raise ValueError(f"{path}: {', '.join(unpinned)} without ==version")
    return [f"{name}=={version}" for name, version in wanted.items()]


def installed() -> dict[str, metadata.Distribution]:
    """This interpreter's distributions by canonical name (the first one on sys.path wins)."""
    found: dict[str, metadata.Distribution] = {}
    for dist in metadata.distributions():
        found.setdefault(canonical(dist.metadata["Name"]), dist)
    return found


def top_level(dist: metadata.Distribution) -> set[Path]:
    """The entries a distribution put directly in its site-packages folder (packages, modules,
    its .dist-info, .pth files); scripts and data outside it are left out."""
    base = Path(dist.locate_file(""))
    return {base / Path(f).parts[0] for f in dist.files or [] if not str(f).startswith("..")}


def link(dist: metadata.Distribution, site: Path) -> None:
    for entry in top_level(dist):
        target = site / entry.name
        if entry.exists() and not target.exists():
            target.symlink_to(entry)


def build(folder: Path) -> Path:
    """Make the environment in `folder` (which must not exist); returns its python."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True)
    python = folder / "bin" / "python"
    site = Path(subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True).stdout.strip())
    carried_wheels()  # every carried wheel names its version
    wanted = {**requirements(PACKAGES), **requirements(WHEELS)}
    here = installed()
    fetch = []
    for name, version in sorted(wanted.items()):
        if name in here and version in (None, here[name].version):
            link(here[name], site)
        elif version is not None:
            fetch.append(f"{name}=={version}")
    if fetch:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-compile", "--only-binary=:all:",
                        "--target", str(site), *fetch], check=True)
    return python


def main() -> None:
    folder = Path(sys.argv[1])
    python = build(folder)
    print(f"{python}: Python {sysconfig.get_python_version()}, bench/device-packages.txt and "
          f"bench/device-wheels.txt")


if __name__ == "__main__":
    main()
