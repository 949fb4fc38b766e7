"""The generation options every command shares, made from `sdmodel.params`.

`generate`, `submit` and `schedule add` take the same `--sampler`, `--steps`, `--cfg` ...: their
names, ranges and defaults come from the one definition of a request, so a limit changed
there changes in every command, and a value refused here is refused with params' reason.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import click

from sdq.core.errors import InvalidInput
from sdq.core.jobspec import ON_FLAG
from sdq.core.loratags import parse_lora_option
from sdq.core.settings import Settings
from sdq.core.params import (
    CHECKS,
    DEFAULTS,
    MAX_CFG,
    MAX_CLIP_SKIP,
    MAX_ETA,
    MAX_SIDE,
    MAX_STEPS,
    MAX_TAG_CHARS,
    PROMPT_SYNTAXES,
    SAMPLERS,
    SEED_LIMIT,
    SIDE_MULTIPLE,
    ParamError,
    check_tag,
)
from sdq.core.params import text as text_check  # `text` names option help below
from sdq.jobs.adapters import with_folders
from sdq.jobs.templates import GRID_FIELDS, MODES, Expansion, Wildcards, parse_grid

F = TypeVar("F", bound=Callable[..., Any])


class ParamType(click.ParamType):
    """A parameter checked by its `params.CHECKS` entry: the same values refused (NaN and
    infinities included), with the same reasons, as in prompt files."""

    def __init__(self, field: str, name: str, check: Callable[[Any], Any] | None = None) -> None:
        self.field, self.name = field, name
        self.check = check or CHECKS[field]

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        try:
            return self.check(value)
        except ParamError as exc:
            self.fail(exc.reason, param, ctx)


class SamplerType(ParamType):
    """A sampler as sdq, AUTOMATIC1111 or diffusers spell it; sdq's name is what is recorded."""

    def __init__(self) -> None:
        super().__init__("sampler", "sampler")

    def get_metavar(self, param: click.Parameter, ctx: click.Context | None = None) -> str:
        return f"[{'|'.join(SAMPLERS)}]"

    def shell_complete(self, ctx: click.Context, param: click.Parameter, incomplete: str) -> list:
        from click.shell_completion import CompletionItem

        return [CompletionItem(name) for name in SAMPLERS if name.startswith(incomplete)]


def option_name(field: str) -> str:
    return "--" + field.replace("_", "-")


_OPTIONS: dict[str, tuple[tuple[str, ...], click.ParamType, str]] = {
    "negative_prompt": ((), ParamType("negative_prompt", "TEXT"),
                        "What the image should not show."),
    "sampler": ((), SamplerType(),
                "A1111 and diffusers spellings are taken too ('Euler a', 'euler_ancestral')."),
    "steps": ((), ParamType("steps", "INTEGER"), f"Denoising steps, 1-{MAX_STEPS}."),
    "cfg": (("--guidance-scale",), ParamType("cfg", "FLOAT"),
            f"Classifier-free guidance scale, 0-{MAX_CFG:g}; 1 or less turns guidance off."),
    "eta": ((), ParamType("eta", "FLOAT"),
            f"DDIM stochasticity, 0-{MAX_ETA:g} (samplers that take it: "
            f"{', '.join(s.name for s in SAMPLERS.values() if s.uses_eta)})."),
    "width": ((), ParamType("width", "INTEGER"),
              f"A multiple of {SIDE_MULTIPLE} up to {MAX_SIDE}."),
    "height": ((), ParamType("height", "INTEGER"),
               f"A multiple of {SIDE_MULTIPLE} up to {MAX_SIDE}."),
    "prompt_syntax": ((), ParamType("prompt_syntax", f"[{'|'.join(PROMPT_SYNTAXES)}]"),
                      "How prompts are read: a1111 (emphasis, BREAK, <lora:...> tags, "
                      "embeddings; docs/prompts.md) or plain (literal text)."),
    "clip_skip": ((), ParamType("clip_skip", "INTEGER"),
                  f"A1111's clip skip, 1-{MAX_CLIP_SKIP}: 1 is CLIP's last layer, 2 the one before."),
}
SEED = ParamType("seed", f"INTEGER 0-{SEED_LIMIT - 1}")
TAG = ParamType("tag", "TEXT", check_tag)
"""A --tag: the characters and length prompt files take in their `tags`."""
NAME = ParamType("name", "TEXT", text_check("name", MAX_TAG_CHARS))
"""A job's --name: what both databases store (no NUL, no lone surrogate), 200 characters."""


def generation_options(seed_help: str, *, scope: str = "", fill_defaults: bool = True
                       ) -> Callable[[F], F]:
    """Add --negative-prompt, --seed, --sampler, --steps, --cfg (alias --guidance-scale),
    --eta, --width, --height, --prompt-syntax and --clip-skip, each passed to the command
    under its params field name.

    `scope` ends every help text but --seed's (e.g. " Of rows without one."). With
    `fill_defaults` False, options left out are None and the help names the default the
    command falls back on, instead of Click filling it in.
    """
    def decorate(command: F) -> F:
        for field, (aliases, kind, text) in reversed(_OPTIONS.items()):
            default = DEFAULTS[field]
            if fill_defaults:
                extra: dict[str, Any] = {"default": default, "show_default": True}
            else:
                extra = {"default": None}
                text = f"{text} [default: {default if default != '' else 'none'}]"
            command = click.option(option_name(field), *aliases, field, type=kind,
                                   help=text + scope, **extra)(command)
        return click.option("--seed", type=SEED, help=seed_help)(command)
    return decorate


class LoraType(click.ParamType):
    """`--lora NAME[:WEIGHT]`, kept as given once checked (`loratags.parse_lora_option`)."""

    name = "NAME[:WEIGHT]"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        try:
            parse_lora_option(value)
        except ParamError as exc:
            self.fail(exc.reason, param, ctx)
        return value


def adapter_options(command: F) -> F:
    """Add --lora NAME[:WEIGHT] (repeatable), --lora-dir DIR (repeatable) and --embeddings-dir
    DIR, passed as `loras`, `lora_dirs` and `embeddings_dir`."""
    for option in reversed([
        click.option("--lora", "loras", multiple=True, type=LoraType(),
                     help="Apply the LoRA NAME.safetensors at WEIGHT (default 1) to every image, "
                          "as a <lora:NAME:WEIGHT> tag in the prompt would; repeatable."),
        click.option("--lora-dir", "lora_dirs", multiple=True,
                     type=click.Path(exists=True, file_okay=False, path_type=Path),
                     help="Folder LoRA names are looked up in; repeatable, searched in order "
                          "[default: $SDQ_LORA_DIR, a path list]."),
        click.option("--embeddings-dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
                     help="Folder of textual-inversion embeddings prompts may name "
                          "[default: $SDQ_EMBEDDINGS_DIR]."),
    ]):
        command = option(command)
    return command


def adapter_settings(settings: Settings, lora_dirs: Sequence[Path], embeddings_dir: Path | None
                     ) -> Settings:
    """The settings with --lora-dir and --embeddings-dir in place of SDQ_LORA_DIR and
    SDQ_EMBEDDINGS_DIR where given (absolute, so a job records where its files were)."""
    return with_folders(settings, [p.resolve() for p in lora_dirs],
                        embeddings_dir.resolve() if embeddings_dir else None)


def safety_options(*, fill_defaults: bool = True) -> Callable[[F], F]:
    """Add --safety-checker PATH|off and --on-flag keep|black|drop (passed as `safety_checker`
    and `on_flag`); with `fill_defaults` False, --on-flag left out is None."""
    def decorate(command: F) -> F:
        command = click.option(
            "--on-flag", type=click.Choice(ON_FLAG), default=ON_FLAG[0] if fill_defaults else None,
            show_default=fill_defaults,
            help="What becomes of an image the safety checker flags: keep it as generated, "
                 "store a black image of the same size, or drop it (no image; the item ends "
                 "done with safety action `dropped`). The verdict is recorded either way."
                 + ("" if fill_defaults else " [default: keep]"))(command)
        return click.option(
            "--safety-checker", metavar="PATH|off",
            help="Score every image with this safety checker: a diffusers safety_checker/ "
                 "folder, a pipeline folder holding one, or a Hugging Face repo id; `off` for "
                 "none [default: $SDQ_SAFETY_CHECKER, else none: images are recorded as not "
                 "checked].")(command)
    return decorate


def check_on_flag(on_flag: str | None, checker: str | None) -> None:
    """`--on-flag black|drop` promises what only a safety checker does: with no checker to
    run (none given, `off`, SDQ_SAFETY_CHECKER unset) it would silently do nothing, so it is
    refused as a usage error (exit status 2) before any work."""
    if checker is None and on_flag not in (None, ON_FLAG[0]):
        raise click.BadParameter(
            f"{on_flag!r} needs a safety checker (--safety-checker PATH, or SDQ_SAFETY_CHECKER); "
            "without one no image is checked", param_hint="'--on-flag'")


@contextmanager
def as_option_errors() -> Iterator[None]:
    """Turn a ParamError raised inside (a combination of values no single option refuses,
    such as --eta with euler) into the usage error of the option it names."""
    try:
        yield
    except ParamError as exc:
        raise click.BadParameter(exc.reason, param_hint=f"'{option_name(exc.field)}'") from None


def template_options(command: F) -> F:
    """Add the prompt template options: --grid, --wildcards, --expand, --draws and
    --expand-seed, passed as `grid`, `wildcards`, `expand`, `draws` and `expand_seed`;
    `expansion_of` makes them an `Expansion`."""
    for option in reversed([
        click.option("--grid", "grid", multiple=True, metavar="FIELD=V1,V2,...",
                     help="Make every prompt with each of these values of a parameter "
                          f"({', '.join(GRID_FIELDS)}); repeatable: every combination."),
        click.option("--wildcards", type=click.Path(exists=True, file_okay=False, path_type=Path),
                     help="Folder of __name__ wildcard files (name.txt, one option per line) "
                          "[default: $SDQ_WILDCARDS]."),
        click.option("--expand", type=click.Choice(MODES), default="combinatorial",
                     show_default=True,
                     help="Templates: every combination, or --draws random ones per row."),
        click.option("--draws", type=click.IntRange(1), default=1, show_default=True,
                     help="With --expand random: prompts drawn per row."),
        click.option("--expand-seed", type=SEED,
                     help="With --expand random: the draws' seed [default: random, recorded "
                          "with the job, so it expands the same way again]."),
    ]):
        command = option(command)
    return command


def expansion_of(grid: Sequence[str], wildcards: Path | None, expand: str, draws: int,
                 expand_seed: int | None) -> Expansion:
    """The options of `template_options` as an Expansion (a bad --grid is a usage error); its
    seed is None when --expand-seed is not given."""
    try:
        parsed = parse_grid(grid)
    except InvalidInput as exc:
        raise click.BadParameter(str(exc), param_hint="'--grid'") from None
    return Expansion(mode=expand, draws=draws, seed=expand_seed, grid=parsed,
                     wildcards=Wildcards(wildcards))


YES = click.option("--yes", "-y", is_flag=True,
                   help="Submit more images than SDQ_CONFIRM_ITEMS (default 10,000) without "
                        "asking.")
