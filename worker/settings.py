"""Settings: environment variables over an optional TOML file, read in one place.

Only `cli/` and `worker/` read settings; they pass plain values down to `sdmodel/` and `db/`,
so library code stays testable without touching the process environment.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Mapping

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10
    import tomli as tomllib

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"


def _config_file(env: Mapping[str, str]) -> Path:
    base = Path(env.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return Path(env.get("SDQ_CONFIG", base / "sdq" / "config.toml"))


@dataclass(frozen=True)
class Settings:
    """The effective settings; `None` for a URL means "use the embedded default"."""

    home: Path
    database_url: str
    storage_url: str
    broker_url: str | None
    model: str
    device: str | None
    dtype: str | None
    batch_size: int | None
    watermark: str
    visibility_timeout: int
    max_attempts: int
    fast_path: str = "default"
    compile: bool = False

    @property
    def fast_path_spec(self) -> str:
        """`SDQ_FAST_PATH` with `SDQ_COMPILE` folded in, as `sdmodel.fastpath.FastPath.parse`
        reads it (parsed where the device is known)."""
        return self.fast_path + (",+compile" if self.compile else "")

    @property
    def embedded(self) -> bool:
        """No broker configured: `sdq submit` runs the batches in-process."""
        return self.broker_url is None

    @classmethod
    def load(cls, env: Mapping[str, str] | None = None) -> "Settings":
        """Read `SDQ_*` variables, falling back to the config file's keys of the same name
        (lower case, without the prefix), then to the embedded defaults."""
        env = os.environ if env is None else env
        path = _config_file(env)
        filed: dict[str, object] = {}
        if path.is_file():
            with path.open("rb") as fh:
                try:
                    filed = tomllib.load(fh)
                except tomllib.TOMLDecodeError as exc:
                    raise ValueError(f"{path}: {exc}") from exc

        def get(name: str) -> str | None:
            value = env.get(f"SDQ_{name.upper()}")
            if value is None and name in filed:
                value = str(filed[name])
            return value or None

        home = Path(get("home") or Path.home() / ".local" / "share" / "sdq").expanduser()
        raw = {
            "home": home,
            "database_url": get("database_url") or f"sqlite:///{home / 'sdq.db'}",
            "storage_url": get("storage_url") or str(home / "images"),
            "broker_url": get("broker_url"),
            "model": get("model") or DEFAULT_MODEL,
            "device": get("device"),
            "dtype": get("dtype"),
            "batch_size": get("batch_size"),
            "watermark": get("watermark") or "StableDiffusionV1",
            "visibility_timeout": get("visibility_timeout") or "3600",
            "max_attempts": get("max_attempts") or "3",
            "fast_path": get("fast_path") or "default",
            "compile": (get("compile") or "0").lower() in ("1", "true", "yes", "on"),
        }
        for field in fields(cls):
            if field.type in ("int", "int | None") and raw[field.name] is not None:
                try:
                    raw[field.name] = int(raw[field.name])  # type: ignore[arg-type]
                except ValueError:
                    raise ValueError(
                        f"SDQ_{field.name.upper()}: expected a whole number, got {raw[field.name]!r}"
                    ) from None
        return cls(**raw)  # type: ignore[arg-type]
