"""The worker image, checked without a Docker engine: its base's torch is one the pinned
transformers accepts, the image installs that transformers, and compose runs it on GPUs.

transformers 5 does not fail loudly on an old torch: it logs one warning and switches its
PyTorch support off, so a worker built on a too-old base starts fine and fails every batch.
"""
from __future__ import annotations

import inspect
import re
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

from .test_compose import compose

ROOT = Path(__file__).parents[2]
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def base_torch(dockerfile: str) -> Version:
    """The torch version of a `pytorch/pytorch:<torch>-cuda...` base, from its tag."""
    match = re.search(r"^FROM pytorch/pytorch:(\d+\.\d+\.\d+)-cuda[\d.]+-cudnn\d+-runtime\s*$",
                      dockerfile, re.M)
    assert match, "the Dockerfile builds FROM a pinned pytorch/pytorch CUDA runtime tag"
    return Version(match.group(1))


def pinned_transformers() -> Version:
    """The transformers version sdq is tested against: constraints.txt's exact pin, the one
    place that names it."""
    [pin] = [Requirement(line) for line in (ROOT / "constraints.txt").read_text().splitlines()
             if line.startswith("transformers")]
    [spec] = pin.specifier
    assert spec.operator == "==", pin
    return Version(spec.version)


def transformers_torch_floor() -> Version:
    """The lowest torch the installed transformers works with: the higher of what it declares
    (`dependency_versions_table`, the source of its package metadata) and what its runtime gate,
    `is_torch_available`, compares against — the gate is what disables PyTorch support."""
    from transformers.dependency_versions_table import deps
    from transformers.utils import import_utils

    declared = Requirement(deps["torch"]).specifier
    floors = [Version(s.version) for s in declared if s.operator in (">=", ">")]
    gate = inspect.getsource(import_utils.is_torch_available)
    floors += [Version(v) for v in re.findall(r'version\.parse\("([\d.]+)"\)', gate)]
    assert floors, "transformers declares no minimum torch any more: read it from its new place"
    return max(floors)


def test_the_base_image_torch_is_one_the_pinned_transformers_accepts() -> None:
    assert Version(metadata.version("transformers")) == pinned_transformers(), \
        "the floor is read from the installed transformers, so it must be the pinned one"
    floor = transformers_torch_floor()
    assert floor >= Version("2.6"), floor  # transformers 5's own floor; a lower read is a misread
    assert base_torch(DOCKERFILE) >= floor, \
        f"Dockerfile base has torch {base_torch(DOCKERFILE)}; transformers " \
        f"{pinned_transformers()} disables itself below {floor}"


def test_the_previous_base_would_be_refused() -> None:
    """The check catches the base this image had before (torch 2.5.1)."""
    old = "FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime\n"
    assert base_torch(old) < transformers_torch_floor()


def test_the_image_installs_the_pinned_transformers_and_keeps_the_base_torch() -> None:
    assert re.search(r"^COPY .*\bconstraints\.txt\b.* \./$", DOCKERFILE, re.M)
    assert "TRANSFORMERS" not in DOCKERFILE, "the version comes from constraints.txt alone"
    constraint = DOCKERFILE.index("grep -E '^transformers==' constraints.txt; } > /tmp/constraints.txt")
    install = DOCKERFILE.index("pip install --no-cache-dir --constraint /tmp/constraints.txt .")
    assert constraint < install, "the base's torch is written as a constraint before the install"


def test_compose_runs_the_worker_from_this_image_on_gpus() -> None:
    worker = compose()["services"]["worker"]
    assert worker["build"] == ".", "the worker is built from this Dockerfile"
    [device] = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]


def test_the_image_copies_every_package_sdq_installs() -> None:
    """pyproject.toml maps each `sdq.*` package onto a top-level folder: the image copies them all."""
    copied = set(re.findall(r"^COPY (\w+) \1$", DOCKERFILE, re.M))
    mapped = set(re.findall(r'^"sdq\.\w+" = "(\w+)"$', (ROOT / "pyproject.toml").read_text(), re.M))
    assert mapped and mapped <= copied, mapped - copied
