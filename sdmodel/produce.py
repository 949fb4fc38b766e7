"""One generation path: requests denoised in batches the device holds, shared by the worker's
runner, `sdq generate` and `sdq reproduce`.

Out of memory (CUDA's error, or the CPU allocator's RuntimeError, which has no class of its
own) halves the batch and keeps it halved for what follows: a device that ran out once would
only run out again at the old size. Each image still comes from its own generator, so a split
changes its pixels by at most the float rounding of another batch shape (DESIGN.md).

A request that runs out of memory alone cannot be helped. The runner asks for `isolate`: such
a request, and one that breaks generation in any other way (found by splitting the batch in
halves until it is alone), comes back as a failure with its reason while the others go on.
Without it, both reach the caller, as they did before the split.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from functools import partial
from itertools import groupby
from typing import Any, Callable, Iterable, Iterator, Protocol, Sequence

import torch
from PIL import Image

from sdq.core.params import BatchShape, GenerationParams, Request

from .img2img import Init
from .lora import canonical, group_by_loras

log = logging.getLogger(__name__)


class Denoiser(Protocol):
    """What generating needs of a pipeline (`pipeline.Pipeline` is one; tests use stand-ins)."""

    sha256: str
    name: str
    device: str
    dtype: str
    vae_dtype: str
    """The autoencoder's dtype (the cache key names it)."""

    def default_batch_size(self, width: int = 512, height: int = 512) -> int: ...

    def generate(self, requests: Sequence[Request], **settings: Any) -> list[Image.Image]: ...


@dataclass(frozen=True)
class Produced:
    """Requests denoised together, or (with `isolate`) one that failed alone."""

    indices: tuple[int, ...]
    """Positions, in the parameters given to `produce`, of the requests this concerns."""
    images: tuple[Image.Image, ...] = ()
    seconds: float = 0.0
    error: str | None = None
    """Why the one request failed, in the user's terms; None when `images` holds its image."""
    redecoded: tuple[int, ...] = ()
    """Positions, in `images`, of those decoded again in float32 (their decode in the
    autoencoder's dtype gave NaN or Inf: `pipeline.Images.redecoded`)."""


def produce(pipe: Denoiser, params: Sequence[GenerationParams], *, batch_size: int | None = None,
            on_step: Callable[[int, int, int], None] | None = None,
            on_smaller: Callable[[int], None] | None = None,
            isolate: bool = False,
            loras: Sequence[Iterable[tuple[str, float, str | None]]] | None = None,
            inits: Sequence[Init | None] | None = None,
            ) -> Iterator[Produced]:
    """Denoise `params` in batches of one LoRA set, one shape and one strength (sets in order
    of first appearance, the one the pipeline has merged now first, so each is merged once;
    then shapes in their sort order, requests in the order given) and at most `batch_size`
    requests (None: what the device holds at that size). `loras[i]` is the LoRA set of
    `params[i]` ((name, weight, sha256) triples; None: no LoRAs anywhere): each set is merged
    once, never per image. `inits`, beside `params`, makes an item image-to-image (None for one
    that starts from noise); a batch shares the strength too, as it decides where the schedule
    starts. `on_step(images, i, steps)` as a batch of `images` reaches step i; `on_smaller(size)`
    when running out of memory lowers the batch size."""
    sets = [canonical(s) for s in loras] if loras is not None else [()] * len(params)
    # The set merged now goes first (a batch that ends with the set the next one starts with
    # switches once less); stand-ins without adapters merge nothing.
    merged = getattr(getattr(pipe, "adapters", None), "current", None)
    rank = {s: n for n, (s, _) in enumerate(group_by_loras(sets, lambda s: s, first=merged))}
    starts = list(inits) if inits is not None else [None] * len(params)
    if len(starts) != len(params):
        raise ValueError(f"got {len(starts)} inits for {len(params)} parameters")

    def key(i: int) -> tuple[int, BatchShape, float]:
        init = starts[i]
        return rank[sets[i]], params[i].shape, 0.0 if init is None else init.strength

    order = sorted(range(len(params)), key=key)
    pending: list[list[int]] = []
    for (_, shape, _strength), group in groupby(order, key=key):
        members = list(group)
        size = batch_size or pipe.default_batch_size(shape.width, shape.height)
        pending.extend(_cut(members, size))
    while pending:
        indices = pending.pop(0)
        shape = params[indices[0]].shape
        start = time.perf_counter()
        try:
            steps = None if on_step is None else partial(on_step, len(indices))
            extra = {"loras": sets[indices[0]]} if loras is not None else {}
            images = pipe.generate([params[i].request for i in indices], **shape.settings(),
                                   **_img2img([starts[i] for i in indices]), on_step=steps,
                                   **extra)
        except Exception as exc:  # noqa: BLE001 - out of memory is split; the rest as asked
            oom = out_of_memory(exc)
            if not isolate and (len(indices) == 1 or not oom):
                raise
            if len(indices) == 1:
                yield Produced(tuple(indices), error=failure_reason(exc, oom, shape))
                continue
            half = len(indices) // 2
            if oom:
                torch.cuda.empty_cache()
                log.warning("out of memory at batch size %d; continuing at %d", len(indices), half)
                if on_smaller is not None:
                    on_smaller(half)
                pending = [*_cut(indices, half), *(p for left in pending for p in _cut(left, half))]
            else:
                log.warning("generating %d items failed (%s); trying them apart", len(indices), exc)
                pending[:0] = [indices[:half], indices[half:]]
            continue
        # A stand-in model returns a plain list: nothing decoded again.
        yield Produced(tuple(indices), tuple(images), time.perf_counter() - start,
                       redecoded=getattr(images, "redecoded", ()))


def _img2img(starts: Sequence[Init | None]) -> dict[str, Any]:
    """`Pipeline.generate`'s img2img arguments for a batch (none for text-to-image)."""
    if starts[0] is None:
        return {}
    return {"init_images": [start.image for start in starts if start is not None],
            "strength": starts[0].strength}


def _cut(indices: list[int], size: int) -> list[list[int]]:
    return [indices[i:i + size] for i in range(0, len(indices), size)]


def out_of_memory(exc: BaseException) -> bool:
    """CUDA's own error, or the CPU allocator's RuntimeError (which has no class of its own)."""
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and ("can't allocate memory" in str(exc)
                                           or "out of memory" in str(exc).lower()))


def failure_reason(exc: BaseException, oom: bool, shape: BatchShape) -> str:
    """The reason recorded for a request that failed alone: what happened, in the user's terms."""
    if oom:
        return f"out of memory generating one {shape.width}x{shape.height} image: {exc}"
    return f"generation: {type(exc).__name__}: {exc}" if not isinstance(exc, ValueError) else str(exc)
