"""`<lora:NAME:WEIGHT>` tags in prompts, and `--lora NAME[:WEIGHT]`, read as A1111 reads them.

A1111 finds its "extra networks" in a prompt with one pattern, `<(\\w+):([^>]+)>`: the kind
(`lora`, `hypernet`, ...) and its arguments, split at `:`; a LoRA's name is the first argument,
its weight the second (1.0 without one). Every such tag is taken out of the text the text
encoder sees, whatever its kind, and the prompt recorded (and written into the infotext) keeps
them as written, so A1111 applies the same LoRAs when it reads the image back. Only the `a1111`
prompt syntax reads tags; a `plain` prompt is text, brackets and tags included.

Pure functions on strings, torch-free: `sdq submit` finds the LoRAs it must resolve without
loading the model stack, and the text encoder's path strips the same tags.
"""
from __future__ import annotations

import math
import re

from sdq.core.params import ParamError

EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")
"""A1111's `re_extra_net`: `<kind:arguments>`."""
LORA_KINDS = ("lora",)
"""The tag kinds that name a LoRA (A1111 reads `<lyco:...>` through an extension only)."""


def _weight(text: str, where: str) -> float:
    try:
        weight = float(text)
    except ValueError:
        weight = math.nan
    if not math.isfinite(weight):
        raise ParamError("lora", f"weight {text!r} in {where!r} is not a number")
    return weight


def lora_tags(prompt: str) -> list[tuple[str, float]]:
    """The (name, weight) of each `<lora:NAME[:WEIGHT]...>` tag of `prompt`, in order.
    ParamError (field `lora`) for a weight that is not a finite number, where A1111 fails too."""
    found = []
    for match in EXTRA_NETWORK.finditer(prompt):
        if match.group(1) in LORA_KINDS:
            args = match.group(2).split(":")
            weight = _weight(args[1], match.group()) if len(args) > 1 and args[1] else 1.0
            found.append((args[0], weight))
    return found


def strip_tags(prompt: str) -> str:
    """The text the text encoder sees: `prompt` without its extra-network tags (any kind)."""
    return EXTRA_NETWORK.sub("", prompt)


def parse_lora_option(value: str) -> tuple[str, float]:
    """`--lora NAME[:WEIGHT]` as (name, weight); ParamError for an empty name or a weight that
    is not a number."""
    name, _, weight = value.strip().partition(":")
    if not name:
        raise ParamError("lora", f"expected NAME[:WEIGHT], got {value!r}")
    return name, _weight(weight, value) if weight else 1.0


def format_lora_option(name: str, weight: float) -> str:
    """The `NAME:WEIGHT` spelling a job records of a `--lora` (`parse_lora_option` reads it)."""
    return f"{name}:{weight:g}"
