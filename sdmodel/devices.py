"""Which device and dtype a run uses by default, and a guess at the device made without torch.

Importing torch takes seconds; a plan (`sdq submit --dry-run`) only needs to know which device
the images would probably be made on, to tell which of them are stored already.
"""
from __future__ import annotations

import platform
import shutil
import sys
from pathlib import Path

_GPU_DRIVERS = (Path("/proc/driver/nvidia/version"), Path("/dev/kfd"))
"""Present when an NVIDIA driver, or AMD's ROCm driver (which torch drives as `cuda`), is loaded."""


def default_dtype(device: str) -> str:
    """Half precision where the hardware is made for it; fp32 on the CPU."""
    return "fp32" if device == "cpu" else "fp16"


def likely_device() -> str:
    """The device `pipeline.default_device` would pick, guessed from the drivers present: a
    GPU driver means `cuda`, Apple silicon `mps`, else `cpu`. Wrong where torch cannot use the
    GPU (a CPU-only build), so it serves estimates only; runs ask torch."""
    if any(path.exists() for path in _GPU_DRIVERS) or shutil.which("nvidia-smi"):
        return "cuda"
    if sys.platform == "darwin" and platform.machine() == "arm64":
        return "mps"
    return "cpu"
