"""Image-to-image: what an init image and its strength are, checked without torch or PIL.

An img2img image starts from an init image's latents noised to the level of step
``steps - int(steps * strength)`` of its schedule and runs the remaining steps, as diffusers'
StableDiffusionImg2ImgPipeline does. The init image is named by the sha256 of its file (so the
same bytes are one image wherever they come from) and by the name it was given.
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .params import SIDE_MULTIPLE, ParamError

DEFAULT_STRENGTH = 0.75
"""AUTOMATIC1111's default denoising strength (diffusers' is 0.8)."""


def check_sha256(value: str) -> str:
    """An init image's name: its file's sha256 as 64 lower-case hex digits (what storage keys
    and records hold), or ValueError."""
    if not isinstance(value, str) or not re.fullmatch(r"[0-9a-f]{64}", value):
        raise ValueError(f"init sha256: expected 64 lower-case hex digits, got {value!r}")
    return value


def check_strength(value: Any) -> float:
    """A strength in (0, 1]: 0 would run no step at all, above 1 has no meaning; NaN and
    infinities are refused, not compared."""
    try:
        number = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(value, bool) or not math.isfinite(number):
        raise ParamError("strength", f"expected a number, got {value!r}")
    if not 0 < number <= 1:
        raise ParamError("strength", f"must be above 0 and at most 1, got {number:g}")
    return number


def steps_run(steps: int, strength: float) -> int:
    """The steps an img2img image runs: `int(steps * strength)`, as diffusers counts them; a
    strength so low that none would run is refused (ParamError) instead of returning the
    init image unchanged."""
    run = int(steps * check_strength(strength))
    if run < 1:
        raise ParamError("strength", f"{strength:g} of {steps} steps runs no step "
                                     f"(int(steps * strength) = 0); raise either")
    return run


def own_size(width: int, height: int) -> tuple[int, int]:
    """The size an init image is used at when none is asked for: its own, each side rounded
    down to a multiple of 8, as diffusers' `VaeImageProcessor` rounds it (the image is then
    resized to it, not cropped)."""
    return width - width % SIDE_MULTIPLE, height - height % SIDE_MULTIPLE


@dataclass(frozen=True)
class InitImage:
    """The record of an img2img image's start: the init file's sha256, the name it came under
    (a file name, never read again to make the image) and the strength."""

    sha256: str
    source: str
    strength: float

    def __post_init__(self) -> None:
        check_sha256(self.sha256)
        object.__setattr__(self, "strength", check_strength(self.strength))

    def to_json(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "source": self.source, "strength": self.strength}

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> "InitImage":
        return cls(record["sha256"], record["source"], record["strength"])

    @classmethod
    def of(cls, record: Any) -> "InitImage | None":
        """The init of anything that records one as items do (`init_sha256`, `init_source`,
        `strength`): a mapping or a database row; None for a text-to-image record."""
        def get(name: str) -> Any:
            return record.get(name) if isinstance(record, Mapping) else getattr(record, name, None)

        if get("init_sha256") is None:
            return None
        return cls(get("init_sha256"), get("init_source") or "", get("strength"))
