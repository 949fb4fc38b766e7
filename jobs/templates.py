"""Prompt templates: variants, wildcard files, weights, and grids over parameters.

The syntax is the dynamic-prompts one, so template files written for it read here:

- `{red|green|blue}`: one of the variants; `{2::red|blue}` weighs `red` twice as heavily as
  `blue` when drawing at random (every variant weighs 1 unless given);
- `__color__`: one line of the wildcard file `color.txt` in the wildcard folder (blank lines
  and lines starting with `#` skipped; `__animals/cats__` reads `animals/cats.txt`);
- both nest: a variant or a wildcard line may hold variants and wildcards of its own;
- `\\{`, `\\}`, `\\|` and `\\_` are the characters themselves.

Expansion is either combinatorial (every combination, the leftmost choice varying slowest,
in the order the variants and the wildcard lines are written) or random (draws from a
`random.Random` whose seed is recorded with the job, so the same job expands the same way
again; weights apply). Every expanded prompt comes with the values chosen, by label: a
variant group is `v1`, `v2`, ... in the order its `{` is written, a wildcard its name (its
own inner choices are `NAME.v1`, ...).

Nothing here reads settings or imports anything heavy: `promptfile` calls it for each row.

Over 400 lines on purpose: parser, counter and expander of one syntax; the counting (done
before anything is built) must follow the expansion node for node.
"""
from __future__ import annotations

import itertools
import random
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Union

from sdq.core.errors import InvalidInput
from sdq.core.init_image import check_strength
from sdq.core.params import CHECKS, FIELDS, ParamError, close_match, draw_seed

MODES = ("combinatorial", "random")
MAX_DEPTH = 10
"""Wildcards within wildcards, at most: deeper is a mistake (or a file that names itself)."""
MAX_NESTING = 20
"""`{` within `{`, at most, in one text: each level costs the parser and the expansion a
few stack frames, and a template nested deeper is a generated mistake, not a prompt."""
GRID_FIELDS = (*(name for name in FIELDS if name not in ("prompt", "negative_prompt")), "strength")
"""What --grid varies: every parameter but the prompts, and img2img's strength (rows with an
init image only)."""
_GRID_CHECKS = {**CHECKS, "strength": check_strength}
_WILDCARD = re.compile(r"__([A-Za-z0-9][A-Za-z0-9_\-/.]*?)__")
_WEIGHT = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)::")
_SPECIAL = ("{", "}", "|", "\\", "_")


MAX_EXPANSION = 1_000_000
"""Prompts one row may expand into at all, `--yes` or not: past it, a template is a mistake.
Counted (`count`) before any prompt is made, so a refusal costs no time or memory."""


class TemplateError(InvalidInput):
    """A template that cannot be expanded; `column` is 1-based, or None for the whole text;
    `field` the prompt field it is in."""

    def __init__(self, reason: str, column: int | None = None) -> None:
        self.reason, self.column, self.field = reason, column, "prompt"
        super().__init__(reason if column is None else f"column {column}: {reason}")


# -- the parsed form ----------------------------------------------------------------------

@dataclass(frozen=True)
class _Choice:
    label: str
    options: tuple[tuple[float, "_Seq"], ...]


@dataclass(frozen=True)
class _Wildcard:
    name: str
    label: str
    column: int


_Node = Union[str, _Choice, _Wildcard]
_Seq = tuple[_Node, ...]


def is_template(text: str) -> bool:
    """Whether `text` holds any template syntax (plain prompts are left exactly as written)."""
    return ("{" in text or "}" in text or _WILDCARD.search(text) is not None
            or re.search(r"\\[{}|\\_]", text) is not None)


def parse(text: str, prefix: str = "") -> _Seq:
    """The template's parts; TemplateError for unbalanced braces or an empty wildcard."""
    return _Parser(text, prefix).sequence(top=True)


class _Parser:
    def __init__(self, text: str, prefix: str) -> None:
        self.text, self.prefix, self.pos = text, prefix, 0
        self.groups = self.open = 0
        self.wildcards: dict[str, int] = {}

    def sequence(self, *, top: bool) -> _Seq:
        """Text, groups and wildcards up to `|` or `}` (inside a group) or the end."""
        nodes: list[_Node] = []
        literal: list[str] = []

        def flush() -> None:
            if literal:
                nodes.extend(_split_wildcards("".join(literal), self, start))
                literal.clear()

        start = self.pos
        while self.pos < len(self.text):
            char = self.text[self.pos]
            if char == "\\" and self.text[self.pos + 1:self.pos + 2] in _SPECIAL:
                # An escaped character is literal; `_` escaped breaks a `__name__` apart.
                literal.append("\x00" if self.text[self.pos + 1] == "_" else self.text[self.pos + 1])
                self.pos += 2
            elif char == "{":
                flush()
                nodes.append(self.group())
                start = self.pos
            elif char in "|}":
                if top:
                    what = "'}' without its '{'" if char == "}" else "'|' outside '{...}'"
                    raise TemplateError(what, self.pos + 1)
                break
            else:
                literal.append(char)
                self.pos += 1
        flush()
        return tuple(nodes)

    def group(self) -> _Choice:
        opened = self.pos
        if self.open >= MAX_NESTING:
            raise TemplateError(f"'{{' nested more than {MAX_NESTING} deep", opened + 1)
        self.open += 1
        self.pos += 1
        self.groups += 1
        label = f"{self.prefix}v{self.groups}"
        options: list[tuple[float, _Seq]] = []
        while True:
            weight = 1.0
            if (match := _WEIGHT.match(self.text, self.pos)) is not None:
                weight = float(match.group(1))
                self.pos = match.end()
            options.append((weight, self.sequence(top=False)))
            if self.pos >= len(self.text):
                raise TemplateError("'{' is never closed", opened + 1)
            if self.text[self.pos] == "}":
                self.pos += 1
                self.open -= 1
                break
            self.pos += 1  # '|'
        if sum(weight for weight, _ in options) <= 0:
            raise TemplateError("every variant weighs 0", opened + 1)
        return _Choice(label, tuple(options))


def _split_wildcards(literal: str, parser: _Parser, start: int) -> list[_Node]:
    nodes: list[_Node] = []
    last = 0
    for match in _WILDCARD.finditer(literal):
        nodes.append(literal[last:match.start()].replace("\x00", "_"))
        name = match.group(1)
        count = parser.wildcards[name] = parser.wildcards.get(name, 0) + 1
        label = parser.prefix + (name if count == 1 else f"{name}_{count}")
        nodes.append(_Wildcard(name, label, start + match.start() + 1))
        last = match.end()
    nodes.append(literal[last:].replace("\x00", "_"))
    return [node for node in nodes if node != ""]


# -- wildcard files -----------------------------------------------------------------------

@dataclass
class Wildcards:
    """The wildcard files of a folder (None: templates may use none), read once each; or,
    for a schedule that keeps what it read, their lines given directly in `lines`."""

    folder: Path | None = None
    lines: dict[str, list[str]] = field(default_factory=dict)
    _parsed: dict[str, tuple[_Seq, ...]] = field(default_factory=dict, repr=False)
    sizes: dict[str, tuple[int, int]] = field(default_factory=dict, repr=False)
    """(prompts, wildcard levels) of each wildcard measured so far (see `count`)."""

    def options(self, name: str, column: int | None = None) -> tuple[_Seq, ...]:
        if name not in self._parsed:
            lines = self.read(name, column)
            try:
                self._parsed[name] = tuple(parse(line, f"{name}.") for line in lines)
            except TemplateError as exc:
                raise TemplateError(f"wildcard __{name}__: {exc}", column) from None
        return self._parsed[name]

    def read(self, name: str, column: int | None = None) -> list[str]:
        """The options of `name`, one per line of its file."""
        if name in self.lines:
            return self.lines[name]
        if self.folder is None:
            raise TemplateError(f"unknown wildcard __{name}__: no wildcard folder "
                                "(--wildcards DIR or SDQ_WILDCARDS)", column)
        path = self.folder / f"{name}.txt"
        if ".." in Path(name).parts or not path.is_file():
            known = sorted(str(p.relative_to(self.folder).with_suffix(""))
                           for p in self.folder.rglob("*.txt")) if self.folder.is_dir() else []
            raise TemplateError(f"unknown wildcard __{name}__: no {path}"
                                + close_match(name, known), column)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise TemplateError(f"wildcard __{name}__: cannot read {path}: {exc}", column) from None
        options = [line.strip() for line in text.splitlines()
                   if line.strip() and not line.strip().startswith("#")]
        if not options:
            raise TemplateError(f"wildcard __{name}__: {path} has no lines", column)
        self.lines[name] = options
        return options

    def used(self) -> dict[str, list[str]]:
        """The lines of every wildcard read so far (what a schedule stores)."""
        return dict(self.lines)


# -- expansion ----------------------------------------------------------------------------

Expanded = tuple[str, dict[str, str]]
"""An expanded prompt and the values chosen for it, by label."""


def count(seq: _Seq, wildcards: Wildcards) -> int:
    """How many prompts combinatorial expansion gives, without making them. Also the check
    that makes expanding safe: every wildcard is read, and one nested more than MAX_DEPTH
    deep, or naming itself, is a TemplateError."""
    total, height = _measure(seq, wildcards, ())
    if height > MAX_DEPTH:
        raise TemplateError(f"wildcards nested more than {MAX_DEPTH} deep")
    return total


def _measure(seq: _Seq, wildcards: Wildcards, within: tuple[str, ...]) -> tuple[int, int]:
    """(prompts, wildcard levels) of `seq`, inside the wildcards `within`. Each wildcard's
    pair is worked out once (`Wildcards.sizes`), so a chain of files each naming the next
    costs lines x files steps, not lines ** files."""
    total, height = 1, 0
    for node in seq:
        if isinstance(node, _Choice):
            options = [_measure(option, wildcards, within) for _, option in node.options]
            total *= sum(n for n, _ in options)
            height = max(height, *(h for _, h in options))
        elif isinstance(node, _Wildcard):
            n, h = _measure_wildcard(node, wildcards, within)
            total, height = total * n, max(height, h + 1)
    return total, height


def _measure_wildcard(node: _Wildcard, wildcards: Wildcards, within: tuple[str, ...]
                      ) -> tuple[int, int]:
    if node.name in wildcards.sizes:
        return wildcards.sizes[node.name]
    if node.name in within:
        chain = " -> ".join(f"__{name}__" for name in (*within[within.index(node.name):], node.name))
        raise TemplateError(f"wildcard __{node.name}__ names itself ({chain})", node.column)
    if len(within) >= MAX_DEPTH:
        raise TemplateError(f"wildcard __{node.name}__: nested more than {MAX_DEPTH} deep",
                            node.column)
    options = [_measure(option, wildcards, (*within, node.name))
               for option in wildcards.options(node.name, node.column)]
    wildcards.sizes[node.name] = (sum(n for n, _ in options), max(h for _, h in options))
    return wildcards.sizes[node.name]


def combinations(seq: _Seq, wildcards: Wildcards) -> Iterator[Expanded]:
    """Every expansion, the leftmost choice varying slowest (after `count` has checked
    `seq`: its depth is bounded)."""
    parts = [list(_node_expansions(node, wildcards)) for node in seq]
    for combo in itertools.product(*parts):
        values: dict[str, str] = {}
        for _, chosen in combo:
            values.update(chosen)
        yield "".join(text for text, _ in combo), values


def _node_expansions(node: _Node, wildcards: Wildcards) -> Iterator[Expanded]:
    if isinstance(node, str):
        yield node, {}
        return
    options = ([option for _, option in node.options] if isinstance(node, _Choice)
               else wildcards.options(node.name, node.column))
    for option in options:
        for text, values in combinations(option, wildcards):
            yield text, {node.label: text, **values}


def draw(seq: _Seq, wildcards: Wildcards, rng: random.Random) -> Expanded:
    """One random expansion (after `count` has checked `seq`); variants by their weights,
    wildcard lines alike."""
    texts: list[str] = []
    values: dict[str, str] = {}
    for node in seq:
        if isinstance(node, str):
            texts.append(node)
            continue
        if isinstance(node, _Choice):
            weights = [weight for weight, _ in node.options]
            option = rng.choices([opt for _, opt in node.options], weights)[0]
        else:
            lines = wildcards.options(node.name, node.column)
            option = lines[rng.randrange(len(lines))]
        text, inner = draw(option, wildcards, rng)
        texts.append(text)
        values.update({node.label: text, **inner})
    return "".join(texts), values


@dataclass(frozen=True)
class Expansion:
    """How a submission's templates expand: `mode` one of MODES; in random mode `draws`
    prompts per row from a generator seeded with `seed`; `grid` the parameter values every
    prompt is made with (see `parse_grid`)."""

    mode: str = "combinatorial"
    draws: int = 1
    seed: int | None = 0
    """None only before it is drawn: a job or schedule records the seed it expanded with."""
    grid: tuple[tuple[str, tuple[Any, ...]], ...] = ()
    wildcards: Wildcards = field(default_factory=Wildcards)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise InvalidInput(f"unknown expansion mode {self.mode!r}; choose from "
                               f"{', '.join(MODES)}")
        if self.draws < 1:
            raise InvalidInput(f"draws must be at least 1, got {self.draws}")

    def drawn(self) -> "Expansion":
        """This expansion with its seed drawn at random if it has none yet."""
        if self.seed is not None:
            return self
        return replace(self, seed=draw_seed())

    def count(self, prompt: str, negative: str) -> int:
        """How many (prompt, negative prompt) pairs `prompts` makes for one row, without
        making them: the product of both texts' combinations, or `draws`. Raises
        TemplateError, its `field` naming the text at fault: a template that does not parse,
        a wildcard that cannot be read, nests too deep or names itself, or a combinatorial
        expansion past MAX_EXPANSION. Every wildcard is read here."""
        total = 1
        for name, text, prefix in (("prompt", prompt, ""), ("negative_prompt", negative, "negative.")):
            try:
                total *= count(self._parsed(text, prefix), self.wildcards)
            except TemplateError as exc:
                exc.field = name
                raise
        if self.mode == "random":
            return self.draws
        if total > MAX_EXPANSION:
            raise TemplateError(f"expands to {total:,} prompts, more than {MAX_EXPANSION:,}")
        return total

    def prompts(self, prompt: str, negative: str, rng: random.Random) -> list[tuple[str, str, dict[str, str]]]:
        """(prompt, negative prompt, values) for one row. The negative prompt's labels are
        prefixed `negative.`. Checks first, as `count` does (TemplateError)."""
        self.count(prompt, negative)
        seqs = [self._parsed(prompt, ""), self._parsed(negative, "negative.")]
        if self.mode == "random":
            out = []
            for _ in range(self.draws):
                (text, values), (neg, neg_values) = (draw(s, self.wildcards, rng) for s in seqs)
                out.append((text, neg, {**values, **neg_values}))
            return out
        return [(text, neg, {**values, **neg_values})
                for (text, values), (neg, neg_values) in itertools.product(
                    *(combinations(s, self.wildcards) for s in seqs))]

    @staticmethod
    def _parsed(text: str, prefix: str) -> _Seq:
        return parse(text, prefix) if is_template(text) else (text,)

    def cells(self) -> list[dict[str, Any]]:
        """The grid's parameter combinations, the first grid option varying slowest ([{}]
        without a grid)."""
        names = [name for name, _ in self.grid]
        return [dict(zip(names, combo)) for combo in itertools.product(*(v for _, v in self.grid))]

    def to_json(self) -> dict[str, Any]:
        """As recorded with a job or a schedule (the wildcard lines read included)."""
        return {"mode": self.mode, "draws": self.draws, "seed": self.seed,
                "grid": {name: list(values) for name, values in self.grid},
                "wildcards": self.wildcards.used()}

    @classmethod
    def from_json(cls, record: Mapping[str, Any], folder: Path | None = None) -> "Expansion":
        """A recorded expansion; wildcards it has no lines for are read from `folder`."""
        return cls(mode=record.get("mode", "combinatorial"), draws=record.get("draws", 1),
                   seed=record.get("seed", 0),
                   grid=tuple((name, tuple(values)) for name, values in record.get("grid", {}).items()),
                   wildcards=Wildcards(folder, lines=dict(record.get("wildcards", {}))))


def parse_grid(specs: Sequence[str]) -> tuple[tuple[str, tuple[Any, ...]], ...]:
    """`--grid cfg=5,7.5,10` options as (field, values), each value checked as the option of
    that name checks it (InvalidInput naming the option and the value)."""
    grid: dict[str, tuple[Any, ...]] = {}
    for spec in specs:
        name, sep, raw = spec.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or not raw.strip():
            raise InvalidInput(f"--grid {spec!r}: expected FIELD=V1,V2,... (e.g. cfg=5,7.5,10)")
        if name not in GRID_FIELDS:
            raise InvalidInput(f"--grid {spec!r}: unknown field {name!r}"
                               f"{close_match(name, GRID_FIELDS)} (grids over: "
                               f"{', '.join(GRID_FIELDS)})")
        if name in grid:
            raise InvalidInput(f"--grid {spec!r}: {name} is given twice")
        try:
            values = tuple(_GRID_CHECKS[name](value.strip()) for value in raw.split(","))
        except ParamError as exc:
            raise InvalidInput(f"--grid {spec!r}: {exc.reason}") from None
        grid[name] = tuple(dict.fromkeys(values))
    return tuple(grid.items())
