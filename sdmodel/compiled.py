"""torch.compile as the fast path's `compile` uses it: one static graph per shape a worker
meets, with Dynamo's recompile limit raised so that every one of them compiles.

Static shapes (`dynamic=False`) let Inductor specialise each graph to its batch and size; the
fast path's `pad_sizes` keeps those shapes few (`fastpath.bucket_size`). Few is still more than
Dynamo's default limit of 8 graphs per function: past it, new shapes silently run uncompiled.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, Union

from .fastpath import compiled_shapes

CompileBackend = Union[str, Callable[..., Any]]
"""A `torch.compile` backend: a name ("inductor", "eager") or a callable (tests count with one)."""


def raise_recompile_limit(limit: int) -> None:
    """Let each compiled function hold `limit` graphs, and all of them together four times
    that (the UNet and the decoder share the total, and graph breaks add frames); a
    higher setting already made is kept. The option's name changed in torch 2.6."""
    from torch._dynamo import config

    for name, value in (("recompile_limit", limit), ("accumulated_recompile_limit", 4 * limit)):
        if not hasattr(config, name):
            name = name.replace("recompile_limit", "cache_size_limit")
        setattr(config, name, max(getattr(config, name), value))


def compile_network(fn: Callable[..., Any], backend: CompileBackend = "inductor") -> Callable[..., Any]:
    """`fn` compiled with static shapes, under a recompile limit that covers the worker's shapes."""
    import torch

    raise_recompile_limit(compiled_shapes())
    return torch.compile(fn, dynamic=False, backend=backend)
