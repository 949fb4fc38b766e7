"""The message contract between whoever plans work and whoever runs it: the batches a message
carries, what a run of them did, and what a runner offers. Plain data, so the job services and
the worker share it without either importing the other."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True)
class Batch:
    """Items meant to be denoised together; `id` is recorded with each item that runs in it."""

    id: str
    item_ids: tuple[int, ...]
    priority: int = 0
    """Its job's; it decides where the message waits, so the message does not carry it."""

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "items": list(self.item_ids)}

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> "Batch":
        return cls(str(record["id"]), tuple(int(i) for i in record["items"]))


@dataclass
class RunReport:
    done: int = 0
    """Items finished as done, reused ones included."""
    failed: int = 0
    skipped: int = 0
    reused: int = 0
    """Done items whose image existed already: no model call."""

    def add(self, other: "RunReport") -> None:
        self.done, self.failed = self.done + other.done, self.failed + other.failed
        self.skipped, self.reused = self.skipped + other.skipped, self.reused + other.reused


class BatchRunner(Protocol):
    """What runs batches here, in-process (the worker's `Runner`): job services are handed one
    for embedded mode instead of importing the worker."""

    def run(self, batches: Sequence[Batch], on_recorded: Callable[[int], None] | None = None,
            on_step: Callable[[int, int, int], None] | None = None) -> RunReport:
        """Run every batch to its end: each item done, failed, or handed back."""
        ...
