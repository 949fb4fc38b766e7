"""What a user asks of a job besides its prompts: its priority and what becomes of an image
the safety checker flags."""
from __future__ import annotations

from typing import Any

from sdq.core.params import CHECKS, DEFAULTS, MAX_BATCH, MAX_IMAGES_PER_ROW, GenerationParams, whole

PRIORITIES = range(10)
"""Job priorities: higher is taken first. Redis has no priority queue; kombu keeps one list per
level and pops the lists in order, so each level here is a list of its own."""

ON_FLAG = ("keep", "black", "drop")
"""What a job does with an image the safety checker flags: store it as generated, store a
black image of the same size instead, or store no image."""
SAFETY_ACTIONS = {"keep": "kept", "black": "blacked", "drop": "dropped"}
"""An item's `safety_action` for each `on_flag` when its image was flagged; an image the
checker passed is always `kept`."""

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
    (checked as `GenerationParams` checks them), `n`, and `seed`, the base seed (None: pick
    one at random)."""

    def __init__(self, *, seed: int | None = None, n: int = 1, **params: Any) -> None:
        unknown = params.keys() - DEFAULTS.keys()
        if unknown:
            raise TypeError(f"unknown default(s): {', '.join(sorted(unknown))}")
        self.seed = None if seed is None else CHECKS["seed"](seed)
        self.n = whole("n", 1, MAX_IMAGES_PER_ROW)(n)
        checked = {name: CHECKS[name](value) for name, value in params.items()}
        self.params: dict[str, Any] = {k: v for k, v in DEFAULTS.items() if k != "seed"} | checked
        GenerationParams(prompt="", **self.params)  # values that do not go together (ParamError)

    def __repr__(self) -> str:
        return f"Defaults({self.to_json()!r})"

    def to_json(self) -> dict[str, Any]:
        """As recorded with a job: every default by its field name."""
        return {**self.params, "seed": self.seed, "n": self.n}
