"""Prompt files: CSV, JSON Lines or plain text, parsed and validated whole into item specs.

A file is either accepted entirely or refused with every problem it has, each as
`FILE:LINE: field: reason`, so a user fixes a 10 000-row file in one round instead of one
error per try, and nothing is ever recorded from a file that is partly wrong. What a file
leaves out comes from `Defaults` (the submit options). Every image's seed is fixed here,
before anything runs: a row's own seed s gives s, s+1, ... for its n images; other images get
the base seed plus their job-wide image index.

Lives beside the worker rather than in `cli/` because the scheduler re-parses the prompt text
a schedule stores, with no command line involved.

Over 400 lines on purpose: the three formats feed one converter and one problem list, so
that a row's checks are written once and a file is accepted or refused whole.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any, overload

from sdq.core.errors import InvalidInput
from sdq.core.init_image import DEFAULT_STRENGTH, check_strength, own_size, steps_run
from sdq.core.jobspec import Defaults
from sdq.core.params import (
    CHECKS,
    MAX_IMAGES_PER_ROW,
    MAX_TAG_CHARS,
    SEED_LIMIT,
    LEGACY_PROMPT_SYNTAX,
    GenerationParams,
    ParamError,
    check_tag,
    close_match,
    draw_seed,
    text,
    whole,
)
from sdq.db.queries import find_model
from sdq.core.settings import DEFAULT_MAX_JOB_ITEMS
from sdq.jobs.adapters import AdapterFinder, Records
from sdq.jobs.inits import MAX_REF_CHARS, InitReader, InitSource, distinct
from sdq.jobs.templates import Expansion, TemplateError, is_template

if TYPE_CHECKING:
    from sqlalchemy.orm import Session
    from transformers import CLIPTokenizer

FIELDS = ("prompt", "negative_prompt", "seed", "n", "steps", "cfg", "sampler", "width", "height",
          "eta", "prompt_syntax", "clip_skip", "model", "tags", "init_image", "strength")
ALIASES = {"cfg_scale": "cfg", "guidance_scale": "cfg", "num_inference_steps": "steps"}
"""Other tools' names for sdq's fields, accepted as columns or keys and recorded as sdq's."""
FORMATS = ("csv", "jsonl", "text")
_SUFFIXES = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".txt": "text"}

ModelResolver = Callable[[str], "int | None"]
"""Maps a row's `model` (a registered name or hash) to a model id; None when unknown, and
LookupError (its message shown) when ambiguous, like `db.queries.find_model`."""


@dataclass(frozen=True)
class Problem:
    """One finding about one line of a file, printed as `FILE:LINE: field: reason`."""

    source: str
    line: int
    field: str
    reason: str

    def __str__(self) -> str:
        if self.line == 0:  # of the whole file, not of a line
            return f"{self.source}: {self.field}: {self.reason}"
        return f"{self.source}:{self.line}: {self.field}: {self.reason}"


def model_resolver(session: Session) -> ModelResolver:
    """A prompt file row's `model` as a registered model's id, as `sdq submit` and schedules read it."""
    def resolve(ref: str) -> int | None:
        model = find_model(session, ref)
        return model.id if model else None
    return resolve


class PromptFileError(InvalidInput):
    """The file was refused; `problems` lists every error found, in file order."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(map(str, problems)))


@dataclass(frozen=True)
class PromptFile:
    """An accepted file: `items` are ready for `db.queries.submit_job`, in job order."""

    source: str
    format: str
    sha256: str
    base_seed: int
    """Recorded with the job, so the seeds of rows without one can be explained later."""
    rows: int
    items: Sequence[dict[str, Any]]
    """Made as they are read (see `ItemSpecs`)."""
    needs_default_model: bool = True
    """Whether some row names no model of its own, so the job's default model makes it."""
    warnings: list[Problem] = field(default_factory=list)
    inits: tuple[InitSource, ...] = ()
    """The distinct init images the items start from (`jobs.inits` stores them)."""


def recorded_name(path: Path | str) -> str:
    """A file name as a job records and problems print it: bytes that are not UTF-8 (a name
    made on another system, which Python holds as lone surrogates) written as `\\xNN`. No
    database stores those bytes as text, and refusing the file for its name would help no one;
    the file is identified by its sha256 anyway."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def read_prompt_file(path: Path, defaults: Defaults, **options: Any) -> PromptFile:
    """Read and parse `path` (see `parse_prompt_file` for the options); OSError if unreadable."""
    return parse_prompt_file(path.read_bytes(), recorded_name(path), defaults, **options)


def parse_prompt_file(
    data: bytes, source: str, defaults: Defaults, *, format: str | None = None,
    resolve_model: ModelResolver | None = None, tokenizer: CLIPTokenizer | None = None,
    rng: random.Random | None = None, expansion: Expansion | None = None, repeat: int = 0,
    max_items: int = DEFAULT_MAX_JOB_ITEMS, adapters: AdapterFinder | None = None,
    inits: InitReader | None = None, starts: Sequence[InitSource] = (),
) -> PromptFile:
    """Validate a whole prompt file and expand it into one item spec per image.

    Prompts and negative prompts are templates (`sdq.jobs.templates`), expanded as
    `expansion` says (default: combinatorially, no grid, no wildcard folder); each image of
    a template records it and the values chosen. Images of one expanded prompt share their
    seeds across the grid's cells, so a grid compares like with like. `repeat` (a schedule's
    run number, for its "add" seed policy) moves every image's seed on by that many times
    the images of its row, or of the file for rows without a seed: the same file then makes
    new images of every prompt.

    `format` is one of FORMATS (default: from the file name's suffix, else JSON Lines when the
    first line is an object, else plain text). `resolve_model` turns a row's `model` into a
    model id; without it no row may name a model. Prompts longer than CLIP's window are
    warnings, not errors, since SD has always truncated them; `tokenizer` defaults to the
    shipped CLIP one. A file of more than `max_items` images (SDQ_MAX_JOB_ITEMS) is a
    problem found by counting, before any row's prompts or items are made. `adapters` finds
    and hashes the LoRAs and embeddings each image names (`loras`, `embeddings` of its spec);
    a name without a file is a problem of its line (default: no folders, so a `<lora:...>` tag
    is one). `inits` reads the init image a row's `init_image` names (default: local paths
    relative to the working folder, no storage); `starts` (`--init-dir`'s images) makes each
    row once per image, in that order, as if its `init_image` named it. An img2img row takes
    the job's strength, else DEFAULT_STRENGTH, and its init image's own size (each side
    rounded down to a multiple of 8) where neither it nor the job gives one. Raises
    PromptFileError listing every problem.
    """
    problems: list[Problem] = []
    text = _decode(data, source, problems)
    fmt = format or _detect_format(source, text)
    if fmt not in FORMATS:
        raise ValueError(f"unknown prompt file format {fmt!r}; known: {', '.join(FORMATS)}")
    readers = {"csv": _csv_records, "jsonl": _jsonl_records, "text": _text_records}
    converter = _Converter(source, defaults, resolve_model, problems, expansion or Expansion(),
                           max_items, adapters, inits)
    each: list[InitSource | None] = [*starts] or [None]
    rows = [row for line, record in readers[fmt](text, source, problems)
            for start in each
            if (row := converter.row(line, record, start)) is not None]
    if converter.over_at is not None:
        problems.append(Problem(source, converter.over_at, "images", f"the file makes "
                                f"{converter.images:,} images, more than {max_items:,} "
                                "(SDQ_MAX_JOB_ITEMS, which --yes does not lift) from this line on"))
    if not rows and not problems:
        problems.append(Problem(source, 1, "file", "no prompts"))
    total = sum(row.images for row in rows)
    room = max(1, SEED_LIMIT - total)
    base = defaults.seed if defaults.seed is not None else \
        rng.randrange(room) if rng is not None else draw_seed(room)
    _check_seed_ranges(rows, base, defaults.seed is not None, source, problems, repeat, total)
    if defaults.strength is not None and rows and all(row.init is None for row in rows):
        problems.append(Problem(source, 0, "strength", "the job's strength applies to "
                                "image-to-image only, and no row has an init_image"))
    if problems:
        # A line that is not UTF-8 shows only that: what else fails there follows from it.
        garbled = {p.line for p in problems if p.field == "encoding"}
        # A row made once per --init-dir image has its problems once, not once per image.
        raise PromptFileError(sorted(dict.fromkeys(
            p for p in problems if p.field == "encoding" or p.line not in garbled),
            key=lambda p: p.line))
    return PromptFile(
        source=source, format=fmt, sha256=hashlib.sha256(data).hexdigest(), base_seed=base,
        rows=len(rows), items=ItemSpecs(rows, base + repeat * total, repeat),
        needs_default_model=any(row.model_id is None for row in rows),
        warnings=_token_warnings(rows, source, tokenizer),
        inits=tuple(distinct(row.init for row in rows if row.init is not None).values()),
    )


class ItemSpecs(Sequence[dict[str, Any]]):
    """The item specs of accepted rows, made each time they are read rather than held: a
    million-image job is a few hundred rows in memory, not a million dicts, while its plan,
    cache lookup and insert each read it once, in order. Indexing walks from the start
    (for a sample, not for random access)."""

    def __init__(self, rows: list[_Row], base: int, repeat: int) -> None:
        self._rows, self._base, self._repeat = rows, base, repeat
        self._len = sum(row.images * len(row.cells) for row in rows)

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return _expand(self._rows, self._base, self._repeat)

    @overload
    def __getitem__(self, index: int) -> dict[str, Any]: ...

    @overload
    def __getitem__(self, index: slice) -> list[dict[str, Any]]: ...

    def __getitem__(self, index: int | slice) -> dict[str, Any] | list[dict[str, Any]]:
        if isinstance(index, slice):
            return list(islice(self, *index.indices(self._len)))
        position = index + self._len if index < 0 else index
        if not 0 <= position < self._len:
            raise IndexError(f"item {index} of {self._len}")
        return next(islice(self, position, None))


@dataclass
class _Row:
    """One validated row; `first_index` is the job-wide seed index of its first image, and
    `params.seed` is meaningless unless `seed` (the row's own) is set. `variants` are its
    expanded (prompt, negative prompt, values), each made `n` times in every grid cell."""

    line: int
    first_index: int
    params: GenerationParams
    seed: int | None
    n: int
    model_id: int | None
    tags: list[str] | None
    variants: list[tuple[str, str, dict[str, str]]]
    cells: list[dict[str, Any]]
    template: str | None
    adapters: list[dict[str, Records]] | None = None
    """Per variant and prompt syntax, the LoRAs and embeddings its images record."""
    init: InitSource | None = None
    strength: float | None = None
    """Image-to-image: the init image and its strength (a --grid strength cell's wins)."""

    @property
    def images(self) -> int:
        """Images with seeds of their own: grid cells share them."""
        return len(self.variants) * self.n


def _decode(data: bytes, source: str, problems: list[Problem]) -> str:
    """UTF-8 text (a BOM is dropped); each undecodable line is a problem, and the rest of the
    file is still parsed, with replacement characters, so its problems are listed too."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        pass
    for number, line in enumerate(data.split(b"\n"), 1):
        try:
            line.decode("utf-8")
        except UnicodeDecodeError as exc:
            problems.append(Problem(source, number, "encoding", f"not UTF-8: byte "
                                    f"0x{line[exc.start]:02x} at column {exc.start + 1}"))
    return data.decode("utf-8-sig", errors="replace")


def _detect_format(source: str, text: str) -> str:
    if (fmt := _SUFFIXES.get(Path(source).suffix.lower())) is not None:
        return fmt
    first = next((line for line in text.splitlines() if line.strip()), "")
    return "jsonl" if first.lstrip().startswith("{") else "text"


def _csv_records(text: str, source: str, problems: list[Problem]
                 ) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line, record) per data row; a record spanning lines (a quoted newline) has its first."""
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    header: list[str | None] | None = None
    start = 1
    try:
        for cells in reader:
            line, start = start, reader.line_num + 1
            if not any(cell.strip() for cell in cells):
                continue
            if header is None:
                header = _csv_header(cells, source, line, problems)
                if "prompt" not in header:
                    return
                continue
            if len(cells) > len(header):
                problems.append(Problem(source, line, "row", f"{len(cells)} cells, but the "
                                        f"header names {len(header)} columns"))
                continue
            yield line, {name: cell for name, cell in zip(header, cells) if name is not None}
    except csv.Error as exc:
        problems.append(Problem(source, start, "csv", str(exc)))
    if header is None:
        problems.append(Problem(source, 1, "header", "no header row (expected e.g. prompt,seed)"))


def _csv_header(cells: list[str], source: str, line: int, problems: list[Problem]
                ) -> list[str | None]:
    """Column names, None for a column to ignore (unknown or repeated, both reported)."""
    names: list[str | None] = []
    for cell in cells:
        spelled = cell.strip().lower()
        name: str | None = ALIASES.get(spelled, spelled)
        if name not in FIELDS:
            problems.append(Problem(source, line, "header", f"unknown column {cell.strip()!r}"
                                    + close_match(spelled, FIELDS)))
            name = None
        elif name in names:
            also = f" (another name for {name!r})" if spelled != name else ""
            problems.append(Problem(source, line, "header", f"duplicate column {spelled!r}{also}"))
            name = None
        names.append(name)
    if "prompt" not in names:
        problems.append(Problem(source, line, "header", "no 'prompt' column"))
    return names


def _jsonl_records(text: str, source: str, problems: list[Problem]
                   ) -> Iterator[tuple[int, dict[str, Any]]]:
    for line, content in enumerate(text.split("\n"), 1):
        if not content.strip():
            continue
        duplicates: list[str] = []

        def pairs(items: list[tuple[str, Any]], duplicates: list[str] = duplicates
                  ) -> dict[str, Any]:
            keys = [key for key, _ in items]
            duplicates.extend(key for n, key in enumerate(keys) if key in keys[:n])
            return dict(items)

        try:
            record = json.loads(content, object_pairs_hook=pairs)
        except json.JSONDecodeError as exc:
            problems.append(Problem(source, line, "json", f"{exc.msg} at column {exc.colno}"))
            continue
        if not isinstance(record, dict):
            problems.append(Problem(source, line, "json",
                                    f"expected an object, got {type(record).__name__}"))
            continue
        problems.extend(Problem(source, line, key, "duplicate field") for key in duplicates)
        fields: dict[str, Any] = {}
        for key, value in record.items():
            name = ALIASES.get(key, key)
            if name not in FIELDS:
                problems.append(Problem(source, line, key, "unknown field" + close_match(key, FIELDS)))
            elif name in fields:
                problems.append(Problem(source, line, key, f"duplicate field (another name for "
                                        f"{name!r})"))
            else:
                fields[name] = value
        yield line, fields


def _text_records(text: str, source: str, problems: list[Problem]
                  ) -> Iterator[tuple[int, dict[str, Any]]]:
    """One prompt per line; blank lines and lines starting with `#` are skipped."""
    for line, content in enumerate(text.split("\n"), 1):
        prompt = content.strip()
        if prompt and not prompt.startswith("#"):
            yield line, {"prompt": prompt}


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected text, got {type(value).__name__}")
    return value.strip()


def _trimmed(check: Callable[[str], str]) -> Callable[[Any], str]:
    """Whitespace-trimmed text that passes `check` (length, characters every database stores)."""
    return lambda value: check(_text(value))


def _tags(value: Any) -> list[str]:
    """Comma-separated text, or (JSON) a list of strings; blanks and repeats dropped."""
    parts = value.split(",") if isinstance(value, str) else value
    if not isinstance(parts, list) or not all(isinstance(tag, str) for tag in parts):
        raise ValueError("expected comma-separated text or a list of strings")
    return list(dict.fromkeys(check_tag(tag.strip()) for tag in parts if tag.strip()))


_CONVERTERS: dict[str, Callable[[Any], Any]] = {
    **CHECKS, "prompt": _trimmed(CHECKS["prompt"]),
    "negative_prompt": _trimmed(CHECKS["negative_prompt"]),
    "n": whole("n", 1, MAX_IMAGES_PER_ROW), "model": _trimmed(text("model", MAX_TAG_CHARS)),
    "tags": _tags, "init_image": _trimmed(text("init_image", MAX_REF_CHARS)),
    "strength": check_strength,
}
"""Each field's cell or JSON value to its recorded value: the parameters' own checks, and
whitespace-trimmed text."""


class _Converter:
    """Turns raw records into rows, filling defaults and collecting every problem."""

    def __init__(self, source: str, defaults: Defaults, resolve_model: ModelResolver | None,
                 problems: list[Problem], expansion: Expansion, max_items: int,
                 adapters: AdapterFinder | None = None, inits: InitReader | None = None) -> None:
        self.source, self.defaults, self.problems = source, defaults, problems
        self.adapters = adapters or AdapterFinder()
        self.inits = inits or InitReader()
        self.expansion, self.cells = expansion, expansion.cells()
        self.rng = random.Random(expansion.seed)
        self.resolve_model = resolve_model
        self.models: dict[str, int | str] = {}
        self.next_index = 0
        self.max_items, self.images = max_items, 0
        self.over_at: int | None = None
        """The line at which the file's images pass `max_items`: from there on rows are
        checked and counted, but their prompts are not made."""

    def row(self, line: int, record: dict[str, Any], start: InitSource | None = None
            ) -> _Row | None:
        """The row, or None when it has problems (all of them recorded); `start` is the
        init image an --init-dir gives it."""
        values: dict[str, Any] = {}
        failed: list[str] = []
        for name, raw in record.items():
            if raw is None or (isinstance(raw, str) and not raw.strip()):
                continue
            try:
                values[name] = _CONVERTERS[name](raw)
            except ParamError as exc:
                failed.append(self._problem(line, name, exc.reason))
            except ValueError as exc:
                failed.append(self._problem(line, name, str(exc)))
        if not values.get("prompt") and "prompt" not in failed:
            failed.append(self._problem(line, "prompt", "missing"))
        begins = self._init(line, values, start, failed)
        model_id = None
        if (model := values.pop("model", None)) is not None:
            found = self._model_id(model)
            if isinstance(found, str):
                failed.append(self._problem(line, "model", found))
            else:
                model_id = found
        first_index = self.next_index
        n = values.pop("n", self.defaults.n)
        if failed:
            self.next_index += n
            return None
        seed, tags = values.pop("seed", None), values.pop("tags", None)
        try:
            params = GenerationParams(**{**self.defaults.params, **values, "seed": seed or 0})
            for cell in self.cells:  # a grid value that does not go with the row (eta, euler)
                shaped = replace(params, **{k: v for k, v in cell.items() if k != "strength"})
                if begins is not None:
                    steps_run(shaped.steps, cell.get("strength", begins[1]))
        except ParamError as exc:  # fields that do not go together (eta with euler)
            self._problem(line, exc.field, exc.reason)
            return None
        try:
            self.images += self.expansion.count(params.prompt, params.negative_prompt) \
                * n * len(self.cells)
            if self.images > self.max_items:
                self.over_at = self.over_at or line
                return None
            variants = self.expansion.prompts(params.prompt, params.negative_prompt, self.rng)
        except TemplateError as exc:
            self._problem(line, exc.field, str(exc))
            return None
        if (unstorable := _unstorable_expansion(variants)) is not None:
            self._problem(line, *unstorable)
            return None
        try:
            adapters = self._adapters(params, variants)
        except ParamError as exc:
            self._problem(line, exc.field, exc.reason)
            return None
        self.next_index += len(variants) * n
        templated = is_template(params.prompt) or is_template(params.negative_prompt)
        return _Row(line=line, first_index=first_index, params=params, seed=seed, n=n,
                    model_id=model_id, tags=tags, variants=variants, cells=self.cells,
                    template=params.prompt if templated else None, adapters=adapters,
                    init=begins[0] if begins else None, strength=begins[1] if begins else None)

    def _init(self, line: int, values: dict[str, Any], start: InitSource | None,
              failed: list[str]) -> tuple[InitSource, float] | None:
        """The row's init image (its `init_image`, else `start`) and strength, or None for
        text to image, taking the init's own size into `values` for the sides nobody gave;
        problems into `failed`."""
        ref, strength = values.pop("init_image", None), values.pop("strength", None)
        init = start
        if ref is not None and start is not None:
            failed.append(self._problem(line, "init_image", "given by --init-dir too; use "
                                        "one or the other"))
        elif ref is not None:
            try:
                init = self.inits.read(ref)
            except ParamError as exc:
                failed.append(self._problem(line, exc.field, exc.reason))
                return None
        if init is None:
            if strength is not None or any("strength" in cell for cell in self.cells):
                failed.append(self._problem(line, "strength", "applies to image-to-image only: "
                                            "give the row an init_image"))
            return None
        own = dict(zip(("width", "height"), own_size(init.width, init.height)))
        for side, size in own.items():
            if side in values or side in self.defaults.sized:
                continue
            try:
                values[side] = CHECKS[side](size)
            except ParamError as exc:
                failed.append(self._problem(line, "init_image", f"{init.source} is "
                                            f"{init.width}x{init.height}, so its own {side} "
                                            f"{exc.reason}; give width and height"))
        if strength is None:
            strength = self.defaults.strength or DEFAULT_STRENGTH
        return init, strength

    def _adapters(self, params: GenerationParams, variants: list[tuple[str, str, dict[str, str]]]
                  ) -> list[dict[str, Records]]:
        """Each variant's LoRAs and embeddings by prompt syntax (a `--grid prompt_syntax=...`
        reads one prompt both ways); ParamError for the first name without a file."""
        syntaxes = {cell.get("prompt_syntax", params.prompt_syntax) for cell in self.cells}
        return [{syntax: self.adapters.resolve(prompt, negative, syntax) for syntax in syntaxes}
                for prompt, negative, _ in variants]

    def _problem(self, line: int, name: str, reason: str) -> str:
        self.problems.append(Problem(self.source, line, name, reason))
        return name

    def _model_id(self, name: str) -> int | str:
        """The model's id, or why there is none; each name is looked up once per file."""
        if name not in self.models:
            try:
                found: int | str | None = self.resolve_model(name) if self.resolve_model else None
            except LookupError as exc:
                found = str(exc)
            self.models[name] = found if found is not None else \
                f"unknown model {name!r}; register it with `sdq models add REF --name {name}`"
        return self.models[name]


def _unstorable_expansion(variants: list[tuple[str, str, dict[str, str]]]
                          ) -> tuple[str, str] | None:
    """(field, reason) of the first expanded text that the prompt checks refuse (a wildcard
    line past the length cap, say), or None: each row's own cells were checked before its
    templates were expanded, their expansions not yet."""
    if len(variants) == 1 and not variants[0][2]:
        return None  # not a template: the cells' checks were the checks
    for number, (prompt, negative, _) in enumerate(variants, 1):
        for name, value in (("prompt", prompt), ("negative_prompt", negative)):
            try:
                CHECKS[name](value)
            except ParamError as exc:
                return name, f"expanded prompt {number:,}: {exc.reason}"
    return None


def _check_seed_ranges(rows: list[_Row], base: int, base_given: bool, source: str,
                       problems: list[Problem], repeat: int, total: int) -> None:
    """Every image's seed must stay below 2^32 (a random base is chosen so that it does)."""
    for row in rows:
        grid_seeds = [cell["seed"] for cell in row.cells if "seed" in cell]
        if grid_seeds and max(grid_seeds) + row.n > SEED_LIMIT:
            problems.append(Problem(source, row.line, "seed", f"--grid seed {max(grid_seeds)} "
                                    f"with n={row.n} runs past {SEED_LIMIT - 1}"))
        elif row.seed is not None and row.seed + (repeat + 1) * row.images > SEED_LIMIT:
            prompts = f" and {len(row.variants)} prompts" if len(row.variants) > 1 else ""
            problems.append(Problem(source, row.line, "seed", f"seed {row.seed} with n={row.n}"
                                    f"{prompts} runs past {SEED_LIMIT - 1}"))
        elif row.seed is None and base_given and \
                base + repeat * total + row.first_index + row.images > SEED_LIMIT:
            problems.append(Problem(source, row.line, "seed", f"--seed {base} + image index "
                                    f"{repeat * total + row.first_index + row.images - 1} runs "
                                    f"past {SEED_LIMIT - 1}; use a smaller --seed"))


def _expand(rows: list[_Row], base: int, repeat: int) -> Iterator[dict[str, Any]]:
    index = 0
    for row in rows:
        common: dict[str, Any] = {**row.params.to_dict(), "tags": row.tags}
        if row.model_id is not None:
            common["model_id"] = row.model_id
        if row.init is not None:
            common |= {"init_sha256": row.init.sha256, "init_source": row.init.source,
                       "strength": row.strength}
        first = row.seed + repeat * row.images if row.seed is not None else base + row.first_index
        for number, (prompt, negative, values) in enumerate(row.variants):
            for k in range(row.n):
                for cell in row.cells:
                    seed = cell["seed"] + k if "seed" in cell else first + number * row.n + k
                    spec = {**common, "prompt": prompt, "negative_prompt": negative, **cell,
                            "row_index": index, "seed": seed}
                    if row.adapters is not None:
                        loras, embeddings = row.adapters[number][spec["prompt_syntax"]]
                        spec |= {"loras": loras} if loras else {}
                        spec |= {"embeddings": embeddings} if embeddings else {}
                    if row.template is not None or cell:
                        spec["template"] = row.template
                        spec["template_values"] = {**values, **cell}
                    yield spec
                    index += 1


def _token_warnings(rows: list[_Row], source: str, tokenizer: CLIPTokenizer | None
                    ) -> list[Problem]:
    """A warning per `plain` prompt that CLIP would cut, naming the words it would drop
    (`a1111` prompts are encoded whole, in 75-token chunks). The tokenizer (transformers'; no
    torch) is loaded only for a file that has such prompts."""
    plain = [row for row in rows if row.params.prompt_syntax == LEGACY_PROMPT_SYNTAX]
    if not plain:
        return []
    from sdq.sdmodel import tokenizer as clip

    tokenizer = tokenizer or clip.prompt_tokenizer()
    dropped: dict[str, str | None] = {}
    warnings = []
    seen: set[tuple[int, str, str]] = set()
    for row in plain:
        for variant in row.variants:
            for prompt_text, name in zip(variant[:2], ("prompt", "negative_prompt")):
                if prompt_text not in dropped:
                    dropped[prompt_text] = (clip.dropped_text(tokenizer, prompt_text)
                                            if prompt_text else None)
                if dropped[prompt_text] is not None and (row.line, name, prompt_text) not in seen:
                    seen.add((row.line, name, prompt_text))
                    warnings.append(Problem(source, row.line, name, f"longer than "
                                            f"{clip.CONTENT_LENGTH} CLIP tokens; dropped: "
                                            f"{dropped[prompt_text]!r}"))
    return warnings
