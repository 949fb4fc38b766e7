"""Imports point inward: cli -> worker -> jobs -> images -> db / sdmodel -> core.

Every import statement of every module is read from the source (type-only and function-level
imports included: they couple the code as much), so the check is exact and takes well under a
second. The core is also imported in a fresh interpreter, to show that it loads no heavy
library at run time either.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = {name: ROOT / folder for name, folder in tomllib.loads(
    (ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"].items()}
"""sdq's packages (`sdq.core`, ...) and the folders they are made from."""

MAY_IMPORT = {
    "core": set(),
    "sdmodel": {"core"},
    "db": {"core"},
    "migrations": {"core", "db"},
    "images": {"core", "db", "sdmodel"},
    "jobs": {"core", "db", "sdmodel", "images"},
    "worker": {"core", "db", "sdmodel", "images", "jobs"},
    "cli": {"core", "db", "sdmodel", "images", "jobs", "worker"},
}
"""The sdq packages each package may import besides itself."""
HEAVY = {"torch", "transformers", "sqlalchemy", "alembic", "celery", "kombu"}
"""What the core never imports: every role uses it, and commands that only check or record
requests must start fast."""
PENDING: set[tuple[str, str]] = set()
"""Upward imports still to remove (none: the runner's split took the last ones out). A pair
listed here must still exist, so that it is struck off when it goes."""


def modules() -> Iterator[tuple[str, Path]]:
    for package, folder in PACKAGE_DIRS.items():
        for path in sorted(folder.rglob("*.py")):
            relative = path.relative_to(folder).with_suffix("").parts
            yield ".".join((package, *relative)).removesuffix(".__init__"), path


def imports(module: str, path: Path) -> Iterator[str]:
    """The absolute name of everything `module` imports."""
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                base = node.module or ""
            else:
                parts = module.split(".")[:len(module.split(".")) - node.level + is_package]
                base = ".".join([*parts, *([node.module] if node.module else [])])
            yield base
            yield from (f"{base}.{alias.name}" for alias in node.names)


def package_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "sdq" and len(parts) > 1 and parts[1] in MAY_IMPORT else None


def upward_imports() -> set[tuple[str, str]]:
    found = set()
    for module, path in modules():
        own = package_of(module)
        assert own is not None, f"{module} is in no layer of MAY_IMPORT"
        for name in imports(module, path):
            other = package_of(name)
            if other is not None and other != own and other not in MAY_IMPORT[own]:
                found.add((module, ".".join(name.split(".")[:3])))
    return found


def test_every_import_points_inward() -> None:
    found = upward_imports()
    assert found - PENDING == set()
    assert PENDING - found == set(), "gone: strike these off PENDING"


def test_the_core_imports_no_heavy_library() -> None:
    heavy = {(module, name) for module, path in modules() if package_of(module) == "core"
             for name in imports(module, path) if name.split(".")[0] in HEAVY}
    assert heavy == set()


def test_every_module_is_in_a_layer() -> None:
    assert set(MAY_IMPORT) == {name.split(".")[1] for name in PACKAGE_DIRS}


def test_importing_the_core_loads_no_heavy_library() -> None:
    names = [module for module, _ in modules() if package_of(module) == "core"]
    code = (f"import sys\nfor name in {names!r}: __import__(name)\n"
            f"print(sorted({{m.split('.')[0] for m in sys.modules}} & {HEAVY!r}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
