"""What a user asks of a job besides its prompts: the `JobSpec`, and the names its options take.

`sdq submit` builds one from its options, `sdq schedule add` too and stores it as JSON (a
schedule's `options`), and each of the schedule's runs loads it again: one definition of the
options a job takes, their checks and their defaults, instead of one per command. It imports
nothing heavy, like the rest of `core`.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sdq.core.errors import InvalidInput
from sdq.core.init_image import check_strength
from sdq.core.loratags import format_lora_option, parse_lora_option
from sdq.core.params import (
    CHECKS,
    DEFAULTS,
    MAX_BATCH,
    MAX_IMAGES_PER_ROW,
    MAX_TAG_CHARS,
    GenerationParams,
    check_tag,
    text,
    whole,
)

PRIORITIES = range(10)
"""Job priorities: higher is taken first. Redis has no priority queue; kombu keeps one list per
level and pops the lists in order, so each level here is a list of its own."""

ON_FLAG = ("keep", "black", "drop")
"""What a job does with an image the safety checker flags: store it as generated, store a
black image of the same size instead, or store no image."""
SAFETY_ACTIONS = {"keep": "kept", "black": "blacked", "drop": "dropped"}
"""An item's `safety_action` for each `on_flag` when its image was flagged; an image the
checker passed is always `kept`."""
CHECKER_FAILED = "safety checker: "
"""How the error of an item failed because its job's safety checker could not be loaded begins
(the runner fails them rather than run them unchecked; `sdq status` counts them by it)."""


def safety_label(record: Mapping[str, Any]) -> str:
    """An item record's verdict in a word or two, as tables, sheets and galleries show it."""
    if record["safety_flagged"] is None:
        return "not checked"
    return f"flagged ({record['safety_action']})" if record["safety_flagged"] else "passed"


SEED_POLICIES = ("same", "fresh", "add")
"""How a schedule's runs choose seeds: the same each night (the result cache makes a re-run
free, and it adds what is new when the file grows), a fresh base seed each night (recorded
with the job), or every image's seed moved on by the images of a night, so that each run adds
new images of every prompt."""
DEFAULT_FIELDS = ("n", *DEFAULTS, "strength")
"""What a job's options may give for the rows that leave it out: `n`, the base `seed`, every
generation parameter but the prompt, and the img2img `strength` (of rows with an init image)."""

DEFAULT_BATCH_SIZE = MAX_BATCH
"""Items planned (and claimed) together by default: as many as the largest batch a worker
denoises at once (an H200 holds 32 at 512x512). Each worker splits a batch into micro-batches
that its own device holds (`Pipeline.default_batch_size`: 8 on a CPU, from free memory on a
GPU), so the submitter need not know the workers' hardware."""


def default_batch_size(*sizes: int | None) -> int:
    """The first batch size given, in the order the caller trusts them (`--batch-size`, the one
    a job recorded, `SDQ_BATCH_SIZE`), else DEFAULT_BATCH_SIZE."""
    return next((size for size in sizes if size), DEFAULT_BATCH_SIZE)


class Defaults:
    """The values rows do not give: any generation parameter but the prompt and the seed
    (checked as `GenerationParams` checks them), `n`, `seed`, the base seed (None: pick
    one at random), and `strength`, that of rows with an init image (None: theirs, else
    `init_image.DEFAULT_STRENGTH`). `sized` names the sides (width, height) given here: an
    img2img row that gives neither it nor the job takes its init image's own."""

    def __init__(self, *, seed: int | None = None, n: int = 1, strength: float | None = None,
                 **params: Any) -> None:
        unknown = params.keys() - DEFAULTS.keys()
        if unknown:
            raise TypeError(f"unknown default(s): {', '.join(sorted(unknown))}")
        self.seed = None if seed is None else CHECKS["seed"](seed)
        self.n = whole("n", 1, MAX_IMAGES_PER_ROW)(n)
        self.strength = None if strength is None else check_strength(strength)
        self.sized = frozenset(params.keys() & {"width", "height"})
        checked = {name: CHECKS[name](value) for name, value in params.items()}
        self.params: dict[str, Any] = {k: v for k, v in DEFAULTS.items() if k != "seed"} | checked
        GenerationParams(prompt="", **self.params)  # values that do not go together (ParamError)

    def __repr__(self) -> str:
        return f"Defaults({self.to_json()!r})"

    def to_json(self) -> dict[str, Any]:
        """As recorded with a job: every default by its field name (`strength` where given)."""
        strength = {} if self.strength is None else {"strength": self.strength}
        return {**self.params, "seed": self.seed, "n": self.n, **strength}


_check_name = text("name", MAX_TAG_CHARS)


@dataclass(frozen=True)
class JobSpec:
    """The options of one job (or of every run of a schedule), as given: None (and an empty
    `defaults` entry) means "not given", so the settings' value (model, batch size, safety
    checker) or the parameter's default applies when the job is made, and a schedule stores
    only what its user said. Checked when built: InvalidInput, or ParamError naming the field."""

    name: str | None = None
    model: str | None = None
    """A checkpoint, a diffusers folder or a Hugging Face repo id (None: `SDQ_MODEL`)."""
    defaults: Mapping[str, Any] = field(default_factory=dict)
    """What rows leave out, by DEFAULT_FIELDS name; checked as `Defaults` checks them."""
    batch_size: int | None = None
    priority: int | None = None
    """One of PRIORITIES (None: 0)."""
    tags: tuple[str, ...] = ()
    safety_checker: str | None = None
    """A folder or a hub id, `off` for none (None: `SDQ_SAFETY_CHECKER`)."""
    on_flag: str | None = None
    """One of ON_FLAG (None: keep)."""
    reuse: bool = True
    """False: every image is generated, even one the result cache holds (`--no-reuse`)."""
    seed_policy: str | None = None
    """A schedule's: one of SEED_POLICIES (None: same with a seed, else fresh)."""
    expansion: Mapping[str, Any] | None = None
    """How templates expand, as `jobs.templates.Expansion.to_json` writes it."""
    loras: tuple[str, ...] = ()
    """`--lora NAME[:WEIGHT]`: LoRAs every image gets besides its prompt's `<lora:...>` tags,
    kept as `NAME:WEIGHT`."""
    lora_dirs: tuple[str, ...] = ()
    """`--lora-dir`: the folders LoRA names are looked up in (none given: `SDQ_LORA_DIR`)."""
    embeddings_dir: str | None = None
    """`--embeddings-dir`: the embeddings folder (None: `SDQ_EMBEDDINGS_DIR`)."""
    init_base: str | None = None
    """The folder a schedule's prompt file was in (absolute), where its runs read the local
    files its `init_image` column names; None for a file that names none."""

    def __post_init__(self) -> None:
        if self.name is not None:
            _check_name(self.name)
        unknown = sorted(self.defaults.keys() - set(DEFAULT_FIELDS))
        if unknown:
            raise InvalidInput(f"unknown default(s): {', '.join(unknown)}")
        given = {k: self.defaults[k] for k in DEFAULT_FIELDS if self.defaults.get(k) is not None}
        # Each value checked (as recorded), and values that do not go together (ParamError).
        checked = Defaults(**given).to_json()
        object.__setattr__(self, "defaults", {k: checked[k] for k in given})
        object.__setattr__(self, "tags", tuple(check_tag(tag) for tag in self.tags))
        object.__setattr__(self, "loras", tuple(format_lora_option(*parse_lora_option(lora))
                                                for lora in self.loras))
        object.__setattr__(self, "lora_dirs", tuple(str(folder) for folder in self.lora_dirs))
        if self.batch_size is not None:
            whole("batch_size", 1, 2**31 - 1)(self.batch_size)
        if self.priority is not None and self.priority not in PRIORITIES:
            raise InvalidInput(f"priority must be {PRIORITIES.start}-{PRIORITIES.stop - 1}, "
                               f"got {self.priority}")
        for what, value, allowed in (("on-flag action", self.on_flag, ON_FLAG),
                                     ("seed policy", self.seed_policy, SEED_POLICIES)):
            if value is not None and value not in allowed:
                raise InvalidInput(f"unknown {what} {value!r}; choose from {', '.join(allowed)}")

    @property
    def seed(self) -> int | None:
        """The base seed given, if any."""
        return self.defaults.get("seed")

    def row_defaults(self) -> Defaults:
        """What rows leave out, the parameters' own defaults filling what the spec does not give."""
        return Defaults(**self.defaults)

    def to_json(self) -> dict[str, Any]:
        """What was given, as a schedule stores it (its `options`): one key per option, in
        DEFAULT_FIELDS order first, nothing for what was not given."""
        values: dict[str, Any] = {
            **self.defaults, "model": self.model, "batch_size": self.batch_size,
            "priority": self.priority, "tags": list(self.tags),
            "safety_checker": self.safety_checker, "on_flag": self.on_flag,
            "seed_policy": self.seed_policy,
            "expansion": dict(self.expansion) if self.expansion is not None else None,
            "name": self.name, "reuse": None if self.reuse else False,
            "loras": list(self.loras), "lora_dirs": list(self.lora_dirs),
            "embeddings_dir": self.embeddings_dir, "init_base": self.init_base}
        return {k: v for k, v in values.items() if v is not None and v != []}

    @classmethod
    def from_json(cls, options: Mapping[str, Any]) -> JobSpec:
        """A spec as `to_json` wrote it, or as a schedule stored it before the JobSpec (the same
        keys, any of them absent: a schedule stored before LoRAs were options loads as having
        none); an unknown key is InvalidInput."""
        own = {"model", "batch_size", "priority", "tags", "safety_checker", "on_flag",
               "seed_policy", "expansion", "name", "reuse", "loras", "lora_dirs", "embeddings_dir",
               "init_base"}
        unknown = sorted(options.keys() - own - set(DEFAULT_FIELDS))
        if unknown:
            raise InvalidInput(f"unknown job option(s): {', '.join(unknown)}")
        given = {k: v for k, v in options.items() if k in own}
        return cls(defaults={k: options[k] for k in DEFAULT_FIELDS if k in options},
                   **{**given, "tags": tuple(given.get("tags") or ()),
                      "loras": tuple(given.get("loras") or ()),
                      "lora_dirs": tuple(given.get("lora_dirs") or ())})
