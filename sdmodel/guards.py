"""Speed-ups that must not cost an image: the fast path's SDPA backend order is kept only
while it works, and an image whose decode overflows in half precision is decoded again in
float32.

Both failures come from the card and PyTorch release, not from the request: some releases'
cuDNN attention raises ("No execution plans support the graph") where it should decline a
shape, and a fine-tuned autoencoder can overflow fp16 in its last up-blocks. Left to the
caller, the first would reach the runner as a generation error (it would split the batch and
fail every item) and the second would store black images as done.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Hashable
from contextlib import AbstractContextManager, ExitStack
from typing import TypeVar

import torch
from torch import Tensor

log = logging.getLogger(__name__)
T = TypeVar("T")


def sdpa_priority() -> AbstractContextManager:
    """SDPA backends tried in the order cuDNN, flash, memory-efficient, math: on Hopper the
    cuDNN kernel is the fastest where it applies, and PyTorch's default order skips it."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
             SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    stack = ExitStack()
    try:
        stack.enter_context(sdpa_kernel(order, set_priority=True))
    except TypeError:  # torch < 2.6 has no priorities: its own order stands
        pass
    return stack


def out_of_memory(exc: BaseException) -> bool:
    """CUDA out-of-memory, which the caller handles by splitting the batch: never the order's fault."""
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc)


class SdpaOrder:
    """Runs work under an SDPA backend order until the order proves broken.

    The first run at each shape (`key`) is guarded: if it raises anything but out-of-memory
    and the same work then succeeds under PyTorch's own order, the order is dropped for the
    life of the process and the drop logged once; the caller gets the result either way. If
    PyTorch's order fails too, the error was not the order's and reaches the caller as it
    came. A shape that ran once under the order runs unguarded after that."""

    def __init__(self, context: Callable[[], AbstractContextManager] = sdpa_priority) -> None:
        self.context = context
        self.dropped: str | None = None
        """Why the order was dropped (the error it raised); None while it is in use."""
        self._proven: set[Hashable] = set()

    def run(self, key: Hashable, work: Callable[[], T]) -> T:
        if self.dropped is not None:
            return work()
        if key in self._proven:
            with self.context():
                return work()
        try:
            with self.context():
                result = work()
        except Exception as exc:  # noqa: BLE001 - any kernel failure; retried under PyTorch's order
            if out_of_memory(exc):
                raise
            result = work()
            self.dropped = f"{type(exc).__name__}: {str(exc)[:300]}"
            log.warning("the fast path's SDPA backend order failed at %s (%s); PyTorch's own order "
                        "from now on", key, self.dropped)
            return result
        self._proven.add(key)
        return result


def nonfinite_rows(x: Tensor) -> list[int]:
    """Positions along the batch whose values are not all finite (NaN or ±Inf)."""
    return (~torch.isfinite(x).flatten(1).all(1)).nonzero().flatten().tolist()


def redo_nonfinite(x: Tensor, redo_fp32: Callable[[list[int]], Tensor] | None, *, step: str,
                   cause: str) -> list[int]:
    """Run again in float32 the rows of `x` (a batch's float32 output of the autoencoder's
    `step`, decoding or encoding) that came out NaN or Inf, in place; returns their positions.
    `redo_fp32(positions)` runs those rows again from their float32 inputs; None means `x` was
    made in float32 already.

    A row that is not finite in float32 either is refused with an error naming `cause`, which
    the caller reports against its item: storing what it makes would store a black image (or
    one made from a broken start) as done."""
    bad = nonfinite_rows(x)
    if bad and redo_fp32 is not None:
        x[bad] = redo_fp32(bad).float()
        log.warning("%s overflowed in half precision for %d image(s) of %d; redid them in float32",
                    step, len(bad), len(x))
    still = nonfinite_rows(x[bad]) if bad else []
    if still:
        raise ValueError(f"image(s) {[bad[i] for i in still]} of the batch: {step} gives NaN/Inf "
                         f"in float32 too: {cause}")
    return bad
