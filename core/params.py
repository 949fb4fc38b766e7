"""The parameters of one image, their limits and defaults, and the sampler registry.

This is the one place that says what a generation request is: the database rows, prompt
files, the command-line options, the runner, the PNG provenance and the pipeline all take
their fields, limits and sampler names from here. It imports nothing heavy (no torch), so
commands that only check or record requests stay fast.

A `GenerationParams` is its two halves, `Request` (what may differ within a batch) and
`BatchShape` (what may not), by inheritance: each field is defined once. Values are checked,
and sampler spellings resolved, when any of the three is built; a bad value raises
`ParamError` naming the field, which a prompt file turns into `FILE:LINE: field: reason` and
the CLI into an option error.
"""
from __future__ import annotations

import difflib
import hashlib
import json
import math
import re
import secrets
from dataclasses import KW_ONLY, dataclass, fields
from typing import Any, Callable, ClassVar, Mapping

SEED_LIMIT = 2**32
"""Seeds live in [0, 2^32): the range a CPU `torch.Generator` seed round-trips through in
every other SD tool, so a seed copied from here reproduces elsewhere."""


def draw_seed(limit: int = SEED_LIMIT) -> int:
    """A seed nobody gave, in [0, limit), from the operating system's generator (never the
    `random` module's state, which a library may have seeded); whoever draws one records it."""
    return secrets.randbelow(limit)


MAX_SIDE = 2048
"""The largest width or height accepted: 16x the area SD v1 was trained at, already far past
where it makes coherent images, and about what one 80 GB GPU decodes."""
SIDE_MULTIPLE = 8
"""Width and height are multiples of the autoencoder's downsampling factor."""
MAX_STEPS = 999
"""Leading spacing with offset 1 (ddim, plms) visits t = 1000 at 1000 steps, past the table."""
MAX_CFG = 100.0
MAX_ETA = 1.0
"""eta = 1 is DDPM-like; beyond it DDIM's noise term has no meaning."""
MAX_BATCH = 32
"""The most images a worker denoises at once when it sizes its batches itself: beyond this a
GPU's throughput no longer rises, results only come later (an H200 holds 32 at 512x512)."""
MAX_IMAGES_PER_ROW = 10_000
"""A cap on a prompt file row's `n` that catches a typo (n=1000000) before it becomes a
million rows."""
HUB_REPO_ID = re.compile(r"[\w.-]+/[\w.-]+")
"""What a Hugging Face repo id looks like (`owner/name`): a reference that is not a local path
and has this form is looked up on the hub."""
MAX_PROMPT_CHARS = 10_000
"""The longest prompt or negative prompt, in characters: CLIP reads 77 tokens (about 300
characters), and tools that chain windows reach a few thousand; beyond this a line is a
mistake (a pasted file), which would otherwise cost minutes and gigabytes to check and store."""
MAX_TAG_CHARS = 200
"""The longest tag, in characters."""
SHORT_HASH_LEN = 10
"""Hex digits of a model's sha256 that users see and type, as AUTOMATIC1111's `Model hash`."""
PROMPT_SYNTAXES = ("a1111", "plain")
"""How a prompt is read: `a1111` as AUTOMATIC1111's web UI reads it (emphasis, BREAK, chunks of
75 tokens, embeddings; docs/prompts.md), `plain` as literal text cut at 75 tokens."""
MAX_CLIP_SKIP = 12
"""CLIP ViT-L/14's layer count: clip skip N (A1111's numbering) conditions on layer 13 - N."""


def short_hash(sha256: str) -> str:
    """The short form of a model hash (also its A1111 `Model hash`)."""
    return sha256[:SHORT_HASH_LEN]


class ParamError(ValueError):
    """A parameter value refused: `field` names it, `reason` says why."""

    def __init__(self, field: str, reason: str) -> None:
        self.field, self.reason = field, reason
        super().__init__(f"{field}: {reason}")


# -- samplers --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Sampler:
    """One sampler sdq runs: its name, how AUTOMATIC1111 writes it, and what it needs."""

    name: str
    a1111: str
    a1111_schedule: str | None
    """A1111's separate `Schedule type`; older versions folded it into the sampler name."""
    uses_eta: bool
    ancestral: bool
    """Draws fresh noise at every step (from each image's own generator)."""
    method: str
    """The update rule, a key of `sdmodel.samplers.METHODS`."""
    spacing: str
    """The timesteps it visits, a key of `sdmodel.samplers.SPACINGS`."""
    aliases: tuple[str, ...] = ()
    """Other tools' spellings (diffusers scheduler names, k-diffusion names)."""


SAMPLERS: dict[str, Sampler] = {s.name: s for s in (
    Sampler("ddim", "DDIM", None, uses_eta=True, ancestral=False, method="ddim",
            spacing="leading", aliases=("ddim_scheduler",)),
    Sampler("plms", "PLMS", None, uses_eta=False, ancestral=False, method="plms",
            spacing="leading", aliases=("pndm",)),
    Sampler("euler", "Euler", None, uses_eta=False, ancestral=False, method="euler",
            spacing="linspace", aliases=("k_euler", "euler_discrete")),
    Sampler("euler_a", "Euler a", None, uses_eta=False, ancestral=True,
            method="euler_ancestral", spacing="linspace",
            aliases=("euler_ancestral", "k_euler_a", "k_euler_ancestral",
                     "euler_ancestral_discrete")),
    Sampler("dpmpp_2m", "DPM++ 2M", None, uses_eta=False, ancestral=False, method="dpmpp_2m",
            spacing="dpm_linspace",
            aliases=("dpmsolver++", "dpm++_2m", "k_dpmpp_2m", "dpmsolver_multistep")),
    Sampler("dpmpp_2m_karras", "DPM++ 2M", "Karras", uses_eta=False, ancestral=False,
            method="dpmpp_2m", spacing="karras",
            aliases=("DPM++ 2M Karras", "dpmsolver++_karras", "dpm++_2m_karras",
                     "k_dpmpp_2m_karras")),
)}
"""sdq's samplers by canonical name, in the order help texts list them."""
DEFAULT_SAMPLER = "ddim"
DEFAULT_STEPS = 50
DEFAULT_CFG = 7.5
DEFAULT_SIZE = 512
"""Width and height of an image whose request gives none: SD v1's training resolution."""


def _spelling(name: str) -> str:
    """The form spellings are compared in: case, spaces, '-' and '_' do not matter."""
    return re.sub(r"[\s_\-]+", " ", name.strip().lower())


# Every spelling of every sampler; A1111's sampler name alone names one only when that sampler
# has no separate schedule type ("DPM++ 2M" is dpmpp_2m, not dpmpp_2m_karras).
_ALIASES: dict[str, str] = {
    _spelling(spelled): s.name
    for s in SAMPLERS.values()
    for spelled in (s.name, s.a1111 if s.a1111_schedule is None else "", *s.aliases) if spelled
}


def close_match(word: str, choices: Any) -> str:
    """A `; did you mean ...?` hint for a misspelt name, or nothing."""
    match = difflib.get_close_matches(word, list(choices), n=1)
    return f"; did you mean {match[0]!r}?" if match else ""


def resolve_sampler(name: Any) -> str:
    """sdq's canonical name for a sampler spelt as sdq, AUTOMATIC1111 or diffusers spell it."""
    if not isinstance(name, str):
        raise ParamError("sampler", f"expected a sampler name, got {name!r}")
    canonical = _ALIASES.get(_spelling(name))
    if canonical is None:
        hint = close_match(name.strip().lower(), SAMPLERS) or close_match(_spelling(name), _ALIASES)
        raise ParamError("sampler", f"unknown sampler {name!r}{hint} (known: {', '.join(SAMPLERS)})")
    return canonical


def sampler_from_a1111(sampler: str | None, schedule: str | None) -> str | None:
    """The sdq sampler an A1111 `Sampler` + `Schedule type` pair names; None if sdq has none."""
    schedule = None if schedule in (None, "Automatic") else schedule
    for s in SAMPLERS.values():
        if (s.a1111, s.a1111_schedule) == (sampler, schedule):
            return s.name
    if schedule is None and sampler:
        return _ALIASES.get(_spelling(sampler))
    return None


# -- one check per field ---------------------------------------------------------------------

def whole(field: str, low: int, high: int) -> Callable[[Any], int]:
    """A whole number in [low, high]; digit strings and integral floats are taken too."""
    def check(value: Any) -> int:
        if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
            number = int(value.strip())
        elif isinstance(value, int) and not isinstance(value, bool):
            number = value
        elif isinstance(value, float) and value.is_integer():
            number = int(value)
        else:
            raise ParamError(field, f"expected a whole number, got {value!r}")
        if not low <= number <= high:
            raise ParamError(field, f"must be between {low} and {high}, got {number}")
        return number
    return check


def finite(field: str, low: float, high: float) -> Callable[[Any], float]:
    """A finite number in [low, high]; NaN and infinities are refused, not compared."""
    def check(value: Any) -> float:
        try:
            number = float(value.strip() if isinstance(value, str) else value)
        except (TypeError, ValueError):
            number = math.nan
        if isinstance(value, bool) or not math.isfinite(number):
            raise ParamError(field, f"expected a number, got {value!r}")
        if not low <= number <= high:
            raise ParamError(field, f"must be between {low:g} and {high:g}, got {number:g}")
        return number
    return check


def side(field: str) -> Callable[[Any], int]:
    """An image side: a multiple of SIDE_MULTIPLE up to MAX_SIDE."""
    in_range = whole(field, SIDE_MULTIPLE, MAX_SIDE)

    def check(value: Any) -> int:
        number = in_range(value)
        if number % SIDE_MULTIPLE:
            raise ParamError(field, f"must be a multiple of {SIDE_MULTIPLE}, got {number}")
        return number
    return check


_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")
"""Characters no database takes the same way: PostgreSQL refuses NUL in text, SQLite keeps it;
a lone surrogate (JSON's "\\ud800", a non-UTF-8 file name) is not Unicode text at all."""


def text(field: str, max_chars: int = MAX_PROMPT_CHARS) -> Callable[[Any], str]:
    """Text of at most `max_chars` characters that every database stores as it is."""
    def check(value: Any) -> str:
        if not isinstance(value, str):
            raise ParamError(field, f"expected text, got {type(value).__name__}")
        if len(value) > max_chars:
            raise ParamError(field, f"longer than {max_chars:,} characters ({len(value):,})")
        if (found := _UNSTORABLE.search(value)) is not None:
            what = "a NUL character" if found.group() == "\x00" else "a lone surrogate"
            raise ParamError(field, f"contains {what} (U+{ord(found.group()):04X}) "
                                    f"at character {found.start() + 1}")
        return value
    return check


def prompt_syntax(value: Any) -> str:
    """One of PROMPT_SYNTAXES, in any case."""
    name = value.strip().lower() if isinstance(value, str) else value
    if name not in PROMPT_SYNTAXES:
        raise ParamError("prompt_syntax", f"unknown prompt syntax {value!r} "
                                          f"(known: {', '.join(PROMPT_SYNTAXES)})")
    return name


CHECKS: dict[str, Callable[[Any], Any]] = {
    "prompt": text("prompt"), "negative_prompt": text("negative_prompt"),
    "seed": whole("seed", 0, SEED_LIMIT - 1), "sampler": resolve_sampler,
    "steps": whole("steps", 1, MAX_STEPS), "cfg": finite("cfg", 0, MAX_CFG),
    "eta": finite("eta", 0, MAX_ETA), "width": side("width"), "height": side("height"),
    "prompt_syntax": prompt_syntax, "clip_skip": whole("clip_skip", 1, MAX_CLIP_SKIP),
}
"""Each parameter's check: the value as recorded (a canonical sampler name, a float cfg), or
ParamError. Prompt files run these on their cells, the dataclasses on their fields."""
check_tag = text("tag", MAX_TAG_CHARS)
"""A job's or row's tag (prompt files, --tag)."""


class _Checked:
    """Checks every field when built, in record order (a value as recorded, or ParamError): a
    request or shape in hand is always one the pipeline can run."""

    __dataclass_fields__: ClassVar[dict[str, Any]]

    def __post_init__(self) -> None:
        for name in FIELDS:
            if name in self.__dataclass_fields__:
                object.__setattr__(self, name, CHECKS[name](getattr(self, name)))
        sampler, eta = getattr(self, "sampler", None), getattr(self, "eta", 0.0)
        if sampler is not None and eta and not SAMPLERS[sampler].uses_eta:
            uses = [s.name for s in SAMPLERS.values() if s.uses_eta]
            raise ParamError("eta", f"applies to {', '.join(uses)} only, got eta={eta:g} "
                             f"for {sampler!r}")


# -- the parameters --------------------------------------------------------------------------

@dataclass(frozen=True)
class Request(_Checked):
    """What may differ between images denoised together: each has its own generator."""

    prompt: str
    negative_prompt: str = ""
    seed: int = 0
    cfg: float = DEFAULT_CFG
    """Classifier-free guidance scale; 1 or less turns guidance off for this image."""
    _: KW_ONLY
    prompt_syntax: str = "a1111"
    clip_skip: int = 1
    """A1111's numbering: 1 is CLIP's last layer; the pipeline also checks its model's depth."""


@dataclass(frozen=True, order=True, kw_only=True)
class BatchShape(_Checked):
    """What images must share to be denoised in one batch: the one batch-shape key, used by
    the runner, the batch planner, `submit --dry-run` and `reproduce`. Given by keyword."""

    sampler: str = DEFAULT_SAMPLER
    steps: int = DEFAULT_STEPS
    width: int = DEFAULT_SIZE
    height: int = DEFAULT_SIZE
    eta: float = 0.0

    def settings(self) -> dict[str, Any]:
        """As the keyword arguments of `Pipeline.generate`."""
        return {f.name: getattr(self, f.name) for f in fields(BatchShape)}


@dataclass(frozen=True)
class GenerationParams(BatchShape, Request):  # fields: the request's, then the shape's
    """Everything that decides one image besides the model: a request and its batch shape,
    each field defined once, in its half. Positional arguments are the request's (prompt,
    negative prompt, seed, cfg); the shape's are given by keyword."""

    @classmethod
    def of(cls, record: Any) -> "GenerationParams":
        """The parameters of anything that carries them: a mapping (an item spec, a JSON
        record) or an object (a database row); other keys are ignored."""
        get = record.get if isinstance(record, Mapping) else lambda name, _: getattr(record, name)
        values = {name: get(name, None) for name in FIELDS}
        return cls(**{name: value for name, value in values.items() if value is not None})

    @property
    def request(self) -> Request:
        return Request(**{f.name: getattr(self, f.name) for f in fields(Request)})

    @property
    def shape(self) -> BatchShape:
        return BatchShape(**self.settings())

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in FIELDS}


FIELDS: tuple[str, ...] = ("prompt", "negative_prompt", "seed", "sampler", "steps", "cfg", "eta",
                           "width", "height", "prompt_syntax", "clip_skip")
"""The parameters in the order records list them (item records, CSV columns, provenance,
recorded defaults): a column order, which the two halves' fields cannot give by themselves
(cfg is the request's, between the shape's steps and eta). The prompt syntax and clip skip
came later and come last, so that older column lists are a prefix."""
LEGACY_PROMPT_SYNTAX = "plain"
"""How records made before `prompt_syntax` existed read their prompts (literally): their rows
and PNG chunks say nothing, and reading them as `a1111` would change their images."""
SHAPE_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(BatchShape))
_DEFAULT_OF = {f.name: f.default for f in fields(GenerationParams)}
DEFAULTS = {name: _DEFAULT_OF[name] for name in FIELDS if name != "prompt"}
"""The value of each parameter a request leaves out (seed 0 here; commands pick a random
base seed instead when none is given)."""


def adapter_record(entries: Any, *, weighted: bool) -> list[dict[str, Any]]:
    """LoRAs (`weighted`: name, weight, sha256) or embeddings (name, sha256), given as tuples or
    mappings, as an item, a PNG chunk and the cache key record them: dicts, sorted by name (the
    order a prompt names them in changes nothing). A LoRA may carry `a1111`, the short hash
    A1111's infotext names it by (derived from the file, so no key of its own in the cache)."""
    keys = ("name", "weight", "sha256") if weighted else ("name", "sha256")
    records = [dict(entry) if isinstance(entry, Mapping) else dict(zip(keys, entry))
               for entry in entries or ()]
    records = [{key: record.get(key) for key in keys}
               | ({"a1111": record["a1111"]} if record.get("a1111") else {}) for record in records]
    if weighted:
        for record in records:
            record["weight"] = float(record["weight"])
    return sorted(records, key=lambda r: (r["name"], r.get("weight", 0.0), r["sha256"] or ""))


def cache_key(params: GenerationParams, *, model_sha256: str, watermark: str | None, device: str,
              dtype: str, vae_dtype: str | None = None, safety_checker_sha256: str | None = None,
              on_flag: str = "keep", loras: Any = (), embeddings: Any = (),
              init: Any = None) -> str:
    """The sha256 naming the image these inputs make and the record it is stored with: the
    parameters (prompt syntax and clip skip among them), the model, the LoRAs and embeddings
    by name, weight and file hash (a file changed under the same name makes another image),
    the watermark text, where it runs (the device's kind, `cuda` for `cuda:1`, and the dtype,
    since the same seed gives other pixels in fp16 than in fp32, and the autoencoder's dtype
    when it differs), and the safety checker by file hash with what becomes of a flagged
    image (`on_flag`: a black substitute, no image, or the verdict in the PNG and row), and
    for image-to-image the init image (`init_image.InitImage`: file hash, strength, and the
    source name, which its PNG records). Two items with one key make the same stored image and record, so the second may reuse
    the first's."""
    record = {**params.to_dict(), "model_sha256": model_sha256, "watermark": watermark or "",
              "device": device.split(":")[0], "dtype": dtype}
    # What every key made before these fields existed meant: left out, so those keys still
    # match (an autoencoder in the model's dtype; no check, where `on_flag` does nothing).
    if record["prompt_syntax"] == LEGACY_PROMPT_SYNTAX:
        del record["prompt_syntax"]
    if record["clip_skip"] == 1:
        del record["clip_skip"]
    if vae_dtype not in (None, dtype):
        record["vae_dtype"] = vae_dtype
    if safety_checker_sha256 is not None:
        record["safety"] = {"checker_sha256": safety_checker_sha256, "on_flag": on_flag}
    if loras:
        record["loras"] = [{k: v for k, v in lora.items() if k != "a1111"}
                           for lora in adapter_record(loras, weighted=True)]
    if embeddings:
        record["embeddings"] = adapter_record(embeddings, weighted=False)
    if init is not None:
        record["init"] = init.to_json()
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()
