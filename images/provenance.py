"""An image's provenance, carried inside its PNG, and the checks `sdq verify` runs on it.

Two text chunks travel with every image: `parameters`, in AUTOMATIC1111's format, because the
SD ecosystem (web UIs, image browsers, civitai) already reads it; and `sdq`, JSON with the full
record, because the A1111 line is lossy (prompt lines are stripped, ids and the environment
have no place in it). The JSON also holds a digest of the decoded pixels: unlike the file's
sha256 it can live inside the file, so a file downloaded elsewhere still shows a changed pixel
without the database.

Over 400 lines on purpose: the record, its two encodings in the PNG (A1111's text, written
and read back, and the JSON chunk) and the checks that compare them are one format; apart,
the writer and the reader the checks rely on would drift.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import re
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from enum import Enum
from importlib import metadata
from pathlib import Path
from typing import Any, NamedTuple

from PIL import Image, PngImagePlugin

from sdq.core.errors import InvalidInput
from sdq.core.init_image import InitImage
from sdq.core.params import (
    LEGACY_PROMPT_SYNTAX,
    SAMPLERS,
    SHORT_HASH_LEN,
    GenerationParams,
    adapter_record,
    sampler_from_a1111,
    short_hash,
)
from sdq.core.settings import DEFAULT_PNG_LEVEL

from . import watermark as wm
from .imagefile import ImageFileError, open_image

PARAMETERS_CHUNK = "parameters"
SDQ_CHUNK = "sdq"
FORMAT = 1
"""Version of the `sdq` chunk's layout; readers refuse a newer one instead of misreading it."""

# AUTOMATIC1111's own pattern (modules/infotext_utils.py), so parsing agrees with that tool.
_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_SIZE = re.compile(r"^(\d+)x(\d+)$")
_HASH = re.compile(rf"^[0-9a-f]{{8}}$|^[0-9a-f]{{{SHORT_HASH_LEN}}}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
A1111_HASH_LEN = 12
"""Hex digits of A1111's `Lora hashes` and `TI hashes` entries."""


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
"""The first eight bytes of every PNG file."""


class MetadataError(InvalidInput):
    """The bytes are not a readable PNG."""


def _package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


@dataclass(frozen=True)
class Environment:
    """What decides whether an image can be reproduced bit for bit, not merely closely:
    kernels differ across library versions, devices, GPU models, dtypes and attention backends.
    The initial noise is always drawn on the CPU (`rng_device`), which is what makes seeds
    portable across machines at all."""

    sdq: str | None
    torch: str | None
    transformers: str | None
    device: str
    gpu: str | None
    dtype: str
    attention: str
    rng_device: str = "cpu"
    vae_dtype: str | None = None
    """The autoencoder's dtype where it is not `dtype` (`SDQ_VAE_DTYPE`); None: `dtype`."""


def environment_fingerprint(device: str, dtype: str, attention: str = "sdpa",
                            vae_dtype: str | None = None) -> Environment:
    """The fingerprint of this process; torch is imported only to name a CUDA device, so
    reading or verifying images never pays for it."""
    gpu = None
    if device.startswith("cuda"):
        import torch

        gpu = torch.cuda.get_device_name(torch.device(device))
    return Environment(
        sdq=_package_version("sdq"),
        torch=_package_version("torch"),
        transformers=_package_version("transformers"),
        device=device,
        gpu=gpu,
        dtype=dtype.removeprefix("torch."),
        attention=attention,
        vae_dtype=None if vae_dtype in (None, dtype) else vae_dtype,
    )


@dataclass(frozen=True)
class SafetyVerdict:
    """What the safety checker said of an image and what was done about it: `action` is
    `kept` (stored as generated), `blacked` (a black image stored instead) or `dropped`."""

    checker_sha256: str
    flagged: bool
    concept_scores: tuple[float, ...]
    special_scores: tuple[float, ...]
    action: str

    @property
    def scores(self) -> dict[str, list[float]]:
        """As the item row keeps them (`items.safety_scores`)."""
        return {"concept": list(self.concept_scores), "special": list(self.special_scores)}

    def to_json(self) -> dict[str, Any]:
        return {"checker_sha256": self.checker_sha256, "flagged": self.flagged,
                "scores": self.scores, "action": self.action}

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> "SafetyVerdict":
        return cls(record["checker_sha256"], bool(record["flagged"]),
                   tuple(record["scores"]["concept"]), tuple(record["scores"]["special"]),
                   record["action"])


@dataclass(frozen=True)
class Provenance:
    """Everything that made one image; ids are None for a one-off `sdq generate`.

    The `sdq` chunk keeps the parameters flat beside the other fields (format 1)."""

    params: GenerationParams
    model_sha256: str
    model_name: str
    environment: Environment
    job_id: int | None = None
    item_id: int | None = None
    row: int | None = None
    batch_id: str | None = None
    batch_position: int | None = None
    created: datetime = field(default_factory=lambda: datetime.now(timezone.utc))
    safety: SafetyVerdict | None = None
    """None when no safety check ran (the `sdq` chunk then says `"safety": null`)."""
    loras: tuple[dict[str, Any], ...] = ()
    """The LoRAs applied: {name, weight, sha256} and, where known, `a1111`, the short hash
    A1111's `Lora hashes` field and civitai look files up by."""
    embeddings: tuple[dict[str, Any], ...] = ()
    """The textual-inversion embeddings the prompts used: {name, sha256}."""
    redecoded: str | None = None
    """The dtype the image was decoded again in (`fp32`) because its decode in the
    autoencoder's dtype gave NaN or Inf; None when its first decode stands."""
    init: InitImage | None = None
    """Image-to-image: the init file's sha256, its source name and the strength (the chunk
    says `"init": null` for an image made from noise)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "loras", tuple(adapter_record(self.loras, weighted=True)))
        object.__setattr__(self, "embeddings",
                           tuple(adapter_record(self.embeddings, weighted=False)))
        if not _SHA256.match(self.model_sha256):
            raise ValueError(f"model_sha256: expected 64 lower-case hex digits, "
                             f"got {self.model_sha256!r}")
        if self.created.tzinfo is None:
            raise ValueError("created must be timezone-aware")

    def to_json(self) -> dict[str, Any]:
        record = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "params"}
        record["environment"] = asdict(self.environment)
        record["created"] = self.created.isoformat()
        record["safety"] = self.safety.to_json() if self.safety else None
        record["loras"], record["embeddings"] = list(self.loras), list(self.embeddings)
        record["init"] = self.init.to_json() if self.init else None
        return {**self.params.to_dict(), **record}

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> "Provenance":
        """Inverse of `to_json`; keys a later sdq may add are ignored. A chunk written before
        prompt syntaxes existed read its prompt literally (`plain`)."""
        values = _known_fields(cls, record)
        values["params"] = GenerationParams.of({"prompt_syntax": LEGACY_PROMPT_SYNTAX, **record})
        values["environment"] = Environment(**_known_fields(Environment, record["environment"]))
        values["created"] = datetime.fromisoformat(record["created"])
        values["safety"] = SafetyVerdict.from_json(record["safety"]) if record.get("safety") else None
        values["init"] = InitImage.from_json(record["init"]) if record.get("init") else None
        return cls(**values)


def _known_fields(cls: type, record: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in fields(cls)}
    return {key: value for key, value in record.items() if key in names}


def _quote(value: object) -> str:
    """A1111's `quote`: JSON-quote a value only when a comma, colon or newline would break
    the line apart."""
    text = str(value)
    if "," not in text and ":" not in text and "\n" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def _unquote(text: str) -> str:
    if len(text) < 2 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        return str(json.loads(text))
    except ValueError:
        return text


def format_number(value: float) -> str:
    """A number as A1111 writes it: `7` for a whole value, else the shortest repr (`7.5`)."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


_A1111_SPECIAL = re.compile(r"([\\()\[\]])")
"""What A1111's emphasis parser reads as syntax: brackets, and the backslash escaping them."""


def literal_prompt(prompt: str) -> str:
    """A `plain` prompt written so that A1111 reads it as sdq did, literally: each bracket
    and backslash escaped (`\\(`), so no emphasis is read where sdq applied none. (A `plain`
    prompt over 75 tokens was cut where A1111 would chunk it; no infotext field says so.)"""
    return _A1111_SPECIAL.sub(r"\\\1", prompt)


def _a1111_hashes(entries: tuple[dict[str, Any], ...], key: str) -> str:
    """A1111's `Lora hashes` / `TI hashes` value: `name: hash12, ...`, with `:` and `,` taken
    out of names as A1111 does so the field parses back."""
    return ", ".join(f"{e['name'].replace(':', '').replace(',', '')}: "
                     f"{(e.get(key) or e['sha256'] or '')[:A1111_HASH_LEN]}" for e in entries)


def format_parameters(provenance: Provenance) -> str:
    """The A1111 `parameters` text, field order and spelling as that tool writes them.

    `RNG: CPU` matters: A1111 draws the initial noise on the GPU unless told, so pasting the
    text without it would make another image from the same seed. `<lora:...>` tags stay in
    the prompt as written, as in A1111's own; `Emphasis` is left out, as sdq reads emphasis
    the A1111 default way ("Original"); a `plain` prompt is written escaped (`literal_prompt`)."""
    p = provenance.params
    sampler = SAMPLERS[p.sampler]
    settings: dict[str, object] = {"Steps": p.steps, "Sampler": sampler.a1111}
    if sampler.a1111_schedule:
        settings["Schedule type"] = sampler.a1111_schedule
    settings.update({
        "CFG scale": format_number(p.cfg), "Seed": p.seed, "Size": f"{p.width}x{p.height}",
        "Model hash": short_hash(provenance.model_sha256), "Model": provenance.model_name,
    })
    if provenance.init:
        settings["Denoising strength"] = repr(provenance.init.strength)
    if p.clip_skip != 1:
        settings["Clip skip"] = p.clip_skip
    settings["RNG"] = provenance.environment.rng_device.upper()
    if p.eta:
        settings["Eta DDIM"] = format_number(p.eta)
    if provenance.loras:
        settings["Lora hashes"] = _a1111_hashes(provenance.loras, "a1111")
    if provenance.embeddings:
        settings["TI hashes"] = _a1111_hashes(provenance.embeddings, "sha256")
    settings["Version"] = f"sdq {provenance.environment.sdq}"
    line = ", ".join(f"{k}: {_quote(v)}" for k, v in settings.items())
    written = literal_prompt if p.prompt_syntax == "plain" else str
    negative = f"\nNegative prompt: {written(p.negative_prompt)}" if p.negative_prompt else ""
    return f"{written(p.prompt)}{negative}\n{line}".strip()


@dataclass(frozen=True)
class Parameters:
    """A parsed A1111 `parameters` text: the prompts and the raw `Key: value` settings."""

    prompt: str
    negative_prompt: str
    settings: dict[str, str]

    def _int(self, key: str) -> int | None:
        value = self.settings.get(key, "")
        return int(value) if value.isdigit() else None

    @property
    def seed(self) -> int | None:
        return self._int("Seed")

    @property
    def steps(self) -> int | None:
        return self._int("Steps")

    @property
    def cfg(self) -> float | None:
        try:
            return float(self.settings.get("CFG scale", ""))
        except ValueError:
            return None

    @property
    def rng(self) -> str:
        """Where the initial noise was drawn, as A1111 names it: `CPU`, `GPU` (its default,
        when the text says nothing) or `NV`."""
        return self.settings.get("RNG", "GPU")

    @property
    def size(self) -> tuple[int, int] | None:
        match = _SIZE.match(self.settings.get("Size", ""))
        return (int(match[1]), int(match[2])) if match else None

    @property
    def sampler(self) -> str | None:
        """The sdq name of the sampler, None when sdq has no such sampler."""
        return sampler_from_a1111(self.settings.get("Sampler"), self.settings.get("Schedule type"))

    @property
    def model_hash(self) -> str | None:
        """The 10-hex sha256 prefix of current tools, or the legacy 8-hex hash of older ones."""
        value = self.settings.get("Model hash", "").lower()
        return value if _HASH.match(value) else None

    def model_hash_matches(self, sha256: str) -> bool | None:
        """Whether the hash names the model with this sha256; None when it cannot tell: the
        legacy 8-hex hash covers 64 KiB of the file, not the whole, so no sha256 decides it."""
        value = self.model_hash
        if value is None or len(value) == 8:
            return None
        return sha256.lower().startswith(value)


def parse_parameters(text: str) -> Parameters:
    """Parse as A1111's `parse_generation_parameters` does: the last line is the settings
    line when it holds at least three `Key: value` pairs; lines are stripped."""
    *lines, last = text.strip().split("\n")
    if len(_PARAM.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt = negative = ""
    in_negative = False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:"):].strip()
        if in_negative:
            negative = f"{negative}\n{line}" if negative else line
        else:
            prompt = f"{prompt}\n{line}" if prompt else line
    settings = {key: _unquote(value) for key, value in _PARAM.findall(last)}
    return Parameters(prompt, negative, settings)


class WatermarkStatus(str, Enum):
    """Why an image does or does not carry the invisible watermark."""

    EMBEDDED = "embedded"
    DISABLED = "disabled"
    TOO_SMALL = "too_small"


class EncodedPng(NamedTuple):
    """The file to store, its sha256 (recorded with the item) and the watermark text actually
    embedded (None when the image is unmarked)."""

    data: bytes
    sha256: str
    watermark: str | None


def pixel_digest(image: Image.Image) -> str:
    """sha256 of the RGB pixels and size, independent of PNG compression and chunks."""
    rgb = image.convert("RGB")
    digest = hashlib.sha256(f"RGB {rgb.width}x{rgb.height}\n".encode())
    digest.update(rgb.tobytes())
    return digest.hexdigest()


def encode_png(image: Image.Image, provenance: Provenance, *, watermark: str | None,
               level: int = DEFAULT_PNG_LEVEL) -> EncodedPng:
    """Watermark the image (unless `watermark` is None or empty, or the image is under the
    method's size limit), then write it as a PNG carrying both provenance chunks, compressed
    at zlib `level` (0-9: the level changes the file's size and the time spent, never its
    pixels)."""
    image = image.convert("RGB")
    p = provenance.params
    if image.size != (p.width, p.height):
        raise ValueError(f"image is {image.width}x{image.height}, provenance says "
                         f"{p.width}x{p.height}")
    if not watermark:
        status = WatermarkStatus.DISABLED
    elif wm.can_watermark(image.width, image.height, watermark):
        image, status = wm.embed(image, watermark), WatermarkStatus.EMBEDDED
    else:
        status = WatermarkStatus.TOO_SMALL
    embedded = watermark if status is WatermarkStatus.EMBEDDED else None
    record = {
        "format": FORMAT,
        "provenance": provenance.to_json(),
        "watermark": {"text": embedded, "status": status.value},
        "pixels_sha256": pixel_digest(image),
    }
    info = PngImagePlugin.PngInfo()
    info.add_text(PARAMETERS_CHUNK, format_parameters(provenance))
    info.add_text(SDQ_CHUNK, json.dumps(record, ensure_ascii=True, separators=(",", ":")))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info, compress_level=level)
    data = buffer.getvalue()
    return EncodedPng(data, hashlib.sha256(data).hexdigest(), embedded)


@dataclass(frozen=True)
class PngMetadata:
    """What a PNG says about itself. `errors` lists chunks that exist but could not be read,
    so that a damaged chunk is reported instead of silently looking absent."""

    sha256: str
    width: int
    height: int
    parameters_text: str | None
    parameters: Parameters | None
    provenance: Provenance | None
    watermark: str | None
    watermark_status: WatermarkStatus | None
    pixels_sha256: str | None
    errors: tuple[str, ...] = ()


def _open_png(data: bytes) -> Image.Image:
    """The image in `data`, decoded; MetadataError says what else it is (the caller names
    the file)."""
    try:
        image = open_image(data, "image")
    except ImageFileError as exc:
        if exc.reason.startswith("refused to decode"):  # a few kB that would decode to gigabytes
            raise MetadataError(exc.reason) from None
        if not data.startswith(PNG_SIGNATURE):
            raise MetadataError("not a PNG file (nor any other image)") from None
        raise MetadataError(f"a damaged PNG: {exc.reason}") from None
    if image.format != "PNG":
        raise MetadataError(f"not a PNG but {image.format}")
    return image


def _read_sdq_chunk(text: str) -> dict[str, Any]:
    record = json.loads(text)
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        found = record.get("format") if isinstance(record, dict) else None
        raise ValueError(f"unknown format {found!r} (this sdq reads format {FORMAT})")
    return record


def _read(data: bytes) -> tuple[PngMetadata, Image.Image]:
    image = _open_png(data)
    chunks = {k: v for k, v in image.info.items() if isinstance(v, str)}
    text = chunks.get(PARAMETERS_CHUNK)
    errors: list[str] = []
    provenance, mark, status, pixels = None, None, None, None
    if SDQ_CHUNK in chunks:
        try:
            record = _read_sdq_chunk(chunks[SDQ_CHUNK])
            provenance = Provenance.from_json(record["provenance"])
            mark = record["watermark"]["text"]
            status = WatermarkStatus(record["watermark"]["status"])
            pixels = record["pixels_sha256"]
        except (ValueError, KeyError, TypeError) as exc:
            errors.append(f"{SDQ_CHUNK} chunk unreadable: {exc}")
    meta = PngMetadata(
        sha256=hashlib.sha256(data).hexdigest(),
        width=image.width,
        height=image.height,
        parameters_text=text,
        parameters=parse_parameters(text) if text is not None else None,
        provenance=provenance,
        watermark=mark,
        watermark_status=status,
        pixels_sha256=pixels,
        errors=tuple(errors),
    )
    return meta, image


def read_png_metadata(source: bytes | str | Path) -> PngMetadata:
    """Read both chunks of a PNG (bytes or a path); raises MetadataError for a non-PNG."""
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    return _read(data)[0]


WATERMARK_PRESENT_BER = 0.25
"""Largest bit-error rate still read as "marked". Clean sdq output measures a few percent
and an unmarked image about 50% (for 136 bits, 0.25 is more than five standard deviations
below that), so the threshold separates them while tolerating the method's fragility."""


@dataclass(frozen=True)
class ItemRecord:
    """What the database recorded for an item, as plain values, or what a file says of it."""

    item_id: int | None
    params: GenerationParams
    model_sha256: str | None
    image_sha256: str | None
    watermark: str | None
    safety_flagged: bool | None = None
    """None: no safety check ran."""
    init: InitImage | None = None
    """Image-to-image: the init image and strength; None for text-to-image."""

    @classmethod
    def of(cls, item: Any) -> "ItemRecord":
        """The record of a database item (`db.models.Item`). An item that reuses another's
        image (`reused_from`) is recorded as that item: the file names the item that made it,
        and the reusing row has the same parameters, model and watermark (the same cache key,
        which covers the init image too)."""
        return cls(item_id=getattr(item, "reused_from", None) or item.id, params=item.params,
                   model_sha256=item.model.sha256 if item.model is not None else None,
                   image_sha256=item.image_sha256, watermark=item.watermark,
                   safety_flagged=item.safety_flagged, init=InitImage.of(item))

    def flat(self) -> dict[str, Any]:
        """The parameters beside the other fields, each compared (and named) on its own: the
        init image as its sha256, source and strength."""
        record = {f.name: getattr(self, f.name) for f in fields(self)
                  if f.name not in ("params", "init")}
        init = self.init.to_json() if self.init else {}
        record.update({"init_sha256": init.get("sha256"), "init_source": init.get("source"),
                       "strength": init.get("strength")})
        return {**self.params.to_dict(), **record}


class Check(NamedTuple):
    """One verification outcome; `ok` is None when there was nothing to check against."""

    name: str
    ok: bool | None
    detail: str


@dataclass(frozen=True)
class Verification:
    """The checks run on one PNG; any False among them makes the image fail."""

    metadata: PngMetadata
    watermark_ber: float | None
    checks: tuple[Check, ...]

    @property
    def ok(self) -> bool:
        return all(check.ok is not False for check in self.checks)


def _short(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _differences(found: dict[str, Any], expected: dict[str, Any], theirs: str) -> str:
    return "; ".join(
        f"{key}: file {_short(found.get(key))}, {theirs} {_short(expected.get(key))}"
        for key in sorted(found.keys() | expected.keys())
        if found.get(key) != expected.get(key)
    )


def _comparable(parameters: Parameters) -> dict[str, Any]:
    """The text's content, whichever way sdq spelled it: earlier versions wrote `CFG scale:
    7.0` for 7 and no `RNG` (their noise was on the CPU too), and their files still verify."""
    settings: dict[str, Any] = {"RNG": "CPU", **parameters.settings}
    for key in ("CFG scale", "Eta DDIM"):
        with contextlib.suppress(KeyError, ValueError):
            settings[key] = float(settings[key])
    return {"prompt": parameters.prompt, "negative prompt": parameters.negative_prompt, **settings}


def _check_parameters(meta: PngMetadata, provenance: Provenance) -> Check:
    if meta.parameters is None:
        return Check("parameters chunk", False, "missing")
    found = _comparable(meta.parameters)
    expected = _comparable(parse_parameters(format_parameters(provenance)))
    diff = _differences(found, expected, "sdq chunk")
    return Check("parameters chunk", not diff, diff or "agrees with the sdq chunk")


def _check_watermark(meta: PngMetadata, image: Image.Image) -> tuple[Check, float | None]:
    if meta.watermark_status is WatermarkStatus.EMBEDDED and meta.watermark:
        if not wm.can_watermark(image.width, image.height, meta.watermark):
            return Check("watermark", False, f"recorded as embedded, but a {image.width}x"
                         f"{image.height} image cannot carry {meta.watermark!r}"), None
        ber = wm.detect_watermark(image, meta.watermark)
        bits = len(wm.text_bits(meta.watermark))
        detail = (f"{meta.watermark!r}: {round(ber * bits)}/{bits} bits differ "
                  f"(BER {ber:.1%}, present below {WATERMARK_PRESENT_BER:.0%})")
        return Check("watermark", ber <= WATERMARK_PRESENT_BER, detail), ber
    large = image.width * image.height >= wm.MIN_PIXELS
    if meta.watermark_status is WatermarkStatus.TOO_SMALL and large:
        return Check("watermark", False, f"recorded as too small, but the image is "
                     f"{image.width}x{image.height}"), None
    status = meta.watermark_status.value if meta.watermark_status else "unknown"
    return Check("watermark", None, f"none recorded ({status})"), None


def _file_record(meta: PngMetadata, p: Provenance) -> ItemRecord:
    return ItemRecord(item_id=p.item_id, params=p.params, model_sha256=p.model_sha256,
                      image_sha256=meta.sha256, watermark=meta.watermark,
                      safety_flagged=p.safety.flagged if p.safety else None, init=p.init)


def _check_record(meta: PngMetadata, record: ItemRecord) -> list[Check]:
    sha_ok = record.image_sha256 == meta.sha256
    checks = [Check("database sha256", sha_ok, f"file {meta.sha256[:16]}..., "
                    f"database {(record.image_sha256 or 'none')[:16]}...")]
    if meta.provenance is None:
        return checks + [Check("database parameters", False, "the file has no sdq chunk")]
    found = _file_record(meta, meta.provenance).flat()
    expected = record.flat()
    del found["image_sha256"], expected["image_sha256"]
    diff = _differences(found, expected, "database")
    return checks + [Check("database parameters", not diff,
                           diff or f"match item {record.item_id}")]


def verify_png(data: bytes, record: ItemRecord | None = None) -> Verification:
    """Check a PNG against itself (chunks, pixel digest, watermark) and, given the database's
    record of its item, against that too. Raises MetadataError only for a non-PNG."""
    meta, image = _read(data)
    checks = [Check("sdq chunk", False, error) for error in meta.errors]
    ber = None
    p = meta.provenance
    if p is None and not meta.errors:
        checks.append(Check("sdq chunk", False, "missing: the file carries no sdq provenance"))
    if p is not None:
        g = p.params
        checks.append(Check("sdq chunk", True, f"{g.sampler}, {g.steps} steps, seed {g.seed}, "
                            f"model {short_hash(p.model_sha256)}"))
        checks.append(_check_parameters(meta, p))
        size_ok = (g.width, g.height) == image.size
        checks.append(Check("size", size_ok, f"{image.width}x{image.height}, recorded "
                            f"{g.width}x{g.height}"))
        digest_ok = pixel_digest(image) == meta.pixels_sha256
        checks.append(Check("pixels", digest_ok, "match the recorded digest" if digest_ok
                            else "differ from the recorded digest: the image was altered"))
        mark, ber = _check_watermark(meta, image)
        checks.append(mark)
    if record is not None:
        checks.extend(_check_record(meta, record))
    return Verification(meta, ber, tuple(checks))
