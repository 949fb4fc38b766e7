"""The generation options every command shares, made from `sdmodel.params`.

`generate`, `submit` and `schedule add` take the same `--sampler`, `--steps`, `--cfg` ...: their
names, ranges and defaults come from the one definition of a request, so a limit changed
there changes in every command, and a value refused here is refused with params' reason.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import click

from sdq.sdmodel.params import (
    CHECKS,
    DEFAULTS,
    MAX_CFG,
    MAX_ETA,
    MAX_SIDE,
    MAX_STEPS,
    SAMPLERS,
    SEED_LIMIT,
    SIDE_MULTIPLE,
    ParamError,
    check_tag,
)

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
}
SEED = ParamType("seed", f"INTEGER 0-{SEED_LIMIT - 1}")
TAG = ParamType("tag", "TEXT", check_tag)
"""A --tag: the characters and length prompt files take in their `tags`."""


def generation_options(seed_help: str, *, scope: str = "", fill_defaults: bool = True
                       ) -> Callable[[F], F]:
    """Add --negative-prompt, --seed, --sampler, --steps, --cfg (alias --guidance-scale),
    --eta, --width and --height, each passed to the command under its params field name.

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


@contextmanager
def as_option_errors() -> Iterator[None]:
    """Turn a ParamError raised inside (a combination of values no single option refuses,
    such as --eta with euler) into the usage error of the option it names."""
    try:
        yield
    except ParamError as exc:
        raise click.BadParameter(exc.reason, param_hint=f"'{option_name(exc.field)}'") from None
