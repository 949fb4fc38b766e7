"""Settings: environment variables over an optional TOML file, read in one place.

Only `cli/` and `worker/` read settings; they pass plain values down to `sdmodel/` and `db/`,
so library code stays testable without touching the process environment.
"""
from __future__ import annotations

import difflib
import os
import re
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Mapping
from urllib.parse import parse_qsl, urlencode

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10
    import tomli as tomllib

from sdq.core.errors import InvalidInput

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
DTYPE_NAMES = ("fp16", "bf16", "fp32")
"""The precisions a model runs in (`SDQ_DTYPE`, `--dtype`), by the names sdq records."""
DEFAULT_PNG_LEVEL = 1
"""zlib level of stored PNGs. Level 1 writes a 512x512 image in about half the CPU time of
the usual 6, for files about 8% larger (docs/storage.md has the measurements)."""
MAX_STORE_THREADS = 8
DEFAULT_CONFIRM_ITEMS = 10_000
"""Submissions of more images than this need `--yes`: at a few seconds an image, ten thousand
is a night of one GPU, and a typo (`-n 1000` for 100) should not cost a week."""
VAE_DTYPES = ("fp16", "bf16", "fp32")
DEFAULT_MAX_JOB_ITEMS = 1_000_000
"""No job has more images than this, `--yes` or not (`SDQ_MAX_JOB_ITEMS`): the count is
checked before any item is made, so a runaway template or `-n` is refused at once instead
of filling memory; bigger work is several jobs."""


def default_store_threads(cores: int | None = None) -> int:
    """One store thread per core, up to 8. The watermark's array math, hashing, uploads and
    fsyncs run outside the GIL, so threads overlap them; Pillow's PNG writer holds the GIL,
    which is why the PNG level, not the thread count, sets the ceiling (docs/storage.md)."""
    return max(1, min(MAX_STORE_THREADS, cores or os.cpu_count() or 1))


OUTAGE_S = 1800
"""Seconds storage or the database may stay down before a worker hands its items back
(`SDQ_OUTAGE_TIMEOUT`): long enough for a restart or a failover, never a reason to fail them."""

SAFETY_OFF = "off"


def safety_checker_ref(value: str | None) -> str | None:
    """A safety checker as given (`--safety-checker`, SDQ_SAFETY_CHECKER): None for none."""
    return None if value is None or value.strip().lower() in ("", SAFETY_OFF) else value


class SettingsError(InvalidInput):
    """A setting that cannot be used; the message names where it came from: the variable,
    or the config file and its key."""


_SECRET_KEY = re.compile(r"pass|secret|token|key|signature|credential", re.IGNORECASE)
_DSN_SECRET = re.compile(r"(\b\w*(?:pass|secret|token)\w*\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)",
                         re.IGNORECASE)
"""A secret in a libpq keyword/value connection string: `password=x` or `password='a b'`."""


def _split_netloc(url: str) -> tuple[str, str, str] | None:
    """(scheme://, user info, the rest) of a URL with user info, split at the *last* `@`
    before the path: an unencoded `@` in a password belongs to the password."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return None
    netloc_end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    at = rest.rfind("@", 0, netloc_end)
    if at < 0:
        return None
    return scheme + sep, rest[:at], rest[at:]


def quote_userinfo(url: str) -> str:
    """`url` with `@` in its user name or password percent-encoded, so that every client
    (SQLAlchemy, kombu, redis-py) reads the host that was meant, and none of them puts the
    password's tail in an error message as a host name."""
    parts = _split_netloc(url)
    if parts is None or "@" not in parts[1]:
        return url
    scheme, userinfo, rest = parts
    return scheme + userinfo.replace("@", "%40") + rest


def mask_url(url: str | None) -> str | None:
    """`url` with its password and secret-looking parameters (query values, libpq
    `password=...` words) replaced by `***`; the rest is left exactly as written
    (`sqlite:////abs/path` keeps its slashes). The one masking function: settings shown,
    doctor's findings and database errors all go through it."""
    if not url:
        return url
    parts = _split_netloc(url)
    if parts is not None and ":" in parts[1]:
        scheme, userinfo, rest = parts
        url = f"{scheme}{userinfo.split(':', 1)[0]}:***{rest}"
    scheme, sep, rest = url.partition("://")
    if sep and "?" in rest:
        path, _, query = rest.partition("?")
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(_SECRET_KEY.search(k) for k, _ in pairs):
            masked = urlencode([(k, "***" if _SECRET_KEY.search(k) else v) for k, v in pairs],
                               safe="*")
            url = f"{scheme}{sep}{path}?{masked}"
    elif not sep:
        url = _DSN_SECRET.sub(lambda m: m.group(1) + "***", url)
    return url


_SWITCH = {"1": True, "true": True, "yes": True, "on": True,
           "0": False, "false": False, "no": False, "off": False}
"""The spellings of an on/off setting; anything else is a mistake, not "off"."""


def config_file(env: Mapping[str, str] | None = None) -> Path:
    """Where the config file is read from (it need not exist)."""
    env = os.environ if env is None else env
    base = Path(env.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return Path(env.get("SDQ_CONFIG", base / "sdq" / "config.toml"))


def _default_home(env: Mapping[str, str]) -> Path:
    """Data goes where the XDG base directories put it, as the config file does."""
    return Path(env.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "sdq"


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
    png_level: int
    store_threads: int
    fast_path: str = "default"
    compile: bool = False
    safety_checker: str | None = None
    """The safety checker jobs run unless they say otherwise: a folder or a hub id; None
    (unset, or `off`) for none."""
    outage_timeout: int = OUTAGE_S
    """`SDQ_OUTAGE_TIMEOUT`: seconds a worker waits out an outage (OUTAGE_S)."""
    reconcile_interval: int = 60
    """Seconds between a worker's automatic reconciles (0: never)."""
    wildcards: Path | None = None
    """The folder of prompt templates' `__name__.txt` wildcard files (`--wildcards` overrides)."""
    confirm_items: int = DEFAULT_CONFIRM_ITEMS
    """`SDQ_CONFIRM_ITEMS`: above this many images, `sdq submit` asks for `--yes`."""
    vae_dtype: str | None = None
    """`SDQ_VAE_DTYPE`: the autoencoder's dtype (fp16, bf16, fp32); None: the model's."""
    max_job_items: int = DEFAULT_MAX_JOB_ITEMS
    """`SDQ_MAX_JOB_ITEMS`: no job has more images, `--yes` or not."""
    lora_dir: tuple[Path, ...] = ()
    """`SDQ_LORA_DIR`: the folders LoRA names are looked up in, in order (a path list, split
    at `os.pathsep`; `--lora-dir` overrides)."""
    embeddings_dir: Path | None = None
    """`SDQ_EMBEDDINGS_DIR`: the folder of textual-inversion embeddings (`--embeddings-dir`
    overrides)."""

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
        path = config_file(env)
        filed = _read_config(path, [field.name for field in fields(cls)])

        def get(name: str) -> str | None:
            value = env.get(f"SDQ_{name.upper()}")
            if value is None and name in filed:
                value = str(filed[name])
            return value or None

        def where(name: str) -> str:
            """Where a bad value came from, as the error names it."""
            variable = f"SDQ_{name.upper()}"
            return variable if env.get(variable) else f"{path}: {name}"

        home = Path(get("home") or _default_home(env)).expanduser()
        raw = {
            "home": home,
            "database_url": quote_userinfo(get("database_url") or f"sqlite:///{home / 'sdq.db'}"),
            "storage_url": get("storage_url") or str(home / "images"),
            "broker_url": quote_userinfo(url) if (url := get("broker_url")) else None,
            "model": get("model") or DEFAULT_MODEL,
            "device": get("device"),
            "dtype": get("dtype"),
            "batch_size": get("batch_size"),
            "watermark": get("watermark") or "StableDiffusionV1",
            "visibility_timeout": get("visibility_timeout") or "3600",
            "max_attempts": get("max_attempts") or "3",
            "png_level": get("png_level") or str(DEFAULT_PNG_LEVEL),
            "store_threads": get("store_threads") or str(default_store_threads()),
            "fast_path": get("fast_path") or "default",
            "compile": get("compile") or "0",
            "safety_checker": safety_checker_ref(get("safety_checker")),
            "outage_timeout": get("outage_timeout") or str(OUTAGE_S),
            "reconcile_interval": get("reconcile_interval") or "60",
            "wildcards": Path(wildcards).expanduser() if (wildcards := get("wildcards")) else None,
            "confirm_items": get("confirm_items") or str(DEFAULT_CONFIRM_ITEMS),
            "vae_dtype": get("vae_dtype"),
            "max_job_items": get("max_job_items") or str(DEFAULT_MAX_JOB_ITEMS),
            "lora_dir": path_list(get("lora_dir")),
            "embeddings_dir": Path(folder).expanduser() if (folder := get("embeddings_dir")) else None,
        }
        for field in fields(cls):
            if field.type in ("int", "int | None") and raw[field.name] is not None:
                try:
                    raw[field.name] = int(str(raw[field.name]))
                except ValueError:
                    raise SettingsError(f"{where(field.name)}: expected a whole number, "
                                        f"got {raw[field.name]!r}") from None
        switch = str(raw["compile"]).lower()
        if switch not in _SWITCH:
            raise SettingsError(f"{where('compile')}: expected one of "
                                f"{', '.join(sorted(_SWITCH))}, got {raw['compile']!r}")
        raw["compile"] = _SWITCH[switch]
        for name, low, high in (("png_level", 0, 9), ("store_threads", 1, 64),
                                ("outage_timeout", 0, 10**7), ("reconcile_interval", 0, 10**7),
                                ("confirm_items", 1, 2**62), ("max_job_items", 1, 2**62)):
            if not low <= raw[name] <= high:  # type: ignore[operator]
                raise SettingsError(f"SDQ_{name.upper()}: expected {low} to {high}, got {raw[name]}")
        if raw["vae_dtype"] not in (None, *VAE_DTYPES):
            raise SettingsError(f"{where('vae_dtype')}: expected one of {', '.join(VAE_DTYPES)}, "
                                f"got {raw['vae_dtype']!r}")
        broker = raw["broker_url"]
        if broker is not None and "://" not in str(broker):
            raise SettingsError(f"SDQ_BROKER_URL: {broker!r} has no scheme; expected "
                                "redis://HOST:PORT/DB (rediss:// for TLS)")
        return cls(**raw)  # type: ignore[arg-type]


def path_list(value: str | None) -> tuple[Path, ...]:
    """Folders given as one string, separated by `os.pathsep` (`:`, `;` on Windows), as PATH
    is; empty entries are skipped."""
    return tuple(Path(part).expanduser() for part in (value or "").split(os.pathsep) if part)


def _read_config(path: Path, keys: list[str]) -> dict[str, object]:
    """The config file's keys, or SettingsError naming the file and what is wrong: a syntax
    error (with its line), a key sdq does not know (a typo would otherwise be ignored), or a
    table or list where one value belongs."""
    if not path.is_file():
        return {}
    try:
        with path.open("rb") as fh:
            filed = tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"{path}: not valid TOML: {exc}") from None
    except OSError as exc:
        raise SettingsError(f"{path}: cannot read: {exc.strerror or exc}") from None
    for key, value in filed.items():
        if key not in keys:
            close = difflib.get_close_matches(key, keys, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(keys)}"
            raise SettingsError(f"{path}: {key}: unknown key; {hint}")
        if isinstance(value, (dict, list)):
            raise SettingsError(f"{path}: {key}: expected one value, got a "
                                f"{'table' if isinstance(value, dict) else 'list'}")
    return filed
