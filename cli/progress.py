"""Progress a person can read, on a terminal and in a log.

On a terminal one line is redrawn in place: images done, the denoising step of the images in
hand, elapsed time, time left and the rate. Anywhere else (cron, CI, `2> log`) the same line
is printed whole every `EVERY_S` seconds and at every tenth of the work, so a log shows the
run moving instead of nothing until the end.
"""
from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from typing import IO

EVERY_S = 10.0
"""Seconds between two plain progress lines when not on a terminal (a tenth of the work done
prints one sooner)."""
REDRAW_S = 0.2
"""Seconds between two redraws on a terminal."""


def rate_text(per_s: float | None, unit: str = "image") -> str:
    """`2.40 images/s`, or `12.5 s/image` where images/s would round to 0.00 or read badly
    (under one a second)."""
    if not per_s:
        return f"no {unit}s finished yet"
    return f"{per_s:.2f} {unit}s/s" if per_s >= 1 else f"{1 / per_s:.1f} s/{unit}"


def duration(seconds: float) -> str:
    """`42s`, `3m05s`, `2h07m`."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class ProgressLine:
    """Counts finished units (`advance`, also as the object's call) and, between them, the
    denoising steps of the units in hand (`step`); prints to `stream` (stderr)."""

    def __init__(self, label: str, total: int, done: int = 0, *, unit: str = "image",
                 stream: IO[str] | None = None, clock: Callable[[], float] = time.monotonic
                 ) -> None:
        self.label, self.total, self.done, self.unit = label, total, done, unit
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.clock = clock
        self.started = clock()
        self.first_done = done
        self.partial = 0.0
        """Units in hand times the fraction of their steps done."""
        self.step_text = ""
        self.last_shown = -1e9
        self.last_tenth = -1
        self.lock = threading.Lock()
        """Store threads report stored images while the generating thread reports steps."""
        self.show(force=True)

    def __call__(self, n: int) -> None:
        self.advance(n)

    def advance(self, n: int) -> None:
        with self.lock:
            self.done = min(self.total, self.done + n)
            self.partial, self.step_text = 0.0, ""
            self.show(force=self.done == self.total)

    def step(self, units: int, i: int, steps: int) -> None:
        """Step `i` of `steps` of the `units` images being denoised together (a batch: said so,
        since `of 3` alone reads as a count of steps or jobs)."""
        with self.lock:
            self.partial = units * i / steps if steps else 0.0
            self.step_text = f", step {i}/{steps} of a batch of {units}"
            self.show()

    def line(self) -> str:
        elapsed = self.clock() - self.started
        fraction = min(1.0, (self.done + self.partial) / self.total) if self.total else 1.0
        made = self.done - self.first_done + self.partial
        text = (f"{self.label}: {self.done}/{self.total} {self.unit}s ({fraction:.0%})"
                f"{self.step_text}, {duration(elapsed)} elapsed")
        if 0 < made and self.done < self.total:
            left = elapsed / made * (self.total - self.done - self.partial)
            text += f", about {duration(left)} left"
        if made > 0 and elapsed > 0:
            text += f", {rate_text(made / elapsed, self.unit)}"
        return text

    def show(self, *, force: bool = False) -> None:
        now = self.clock()
        fraction = (self.done + self.partial) / self.total if self.total else 1.0
        tenth = int(fraction * 10)
        due = now - self.last_shown >= (REDRAW_S if self.tty else EVERY_S)
        if not (force or due or (not self.tty and tenth > self.last_tenth)):
            return
        self.last_shown, self.last_tenth = now, max(self.last_tenth, tenth)
        if self.tty:
            self.stream.write("\r\x1b[K" + self.line())
        else:
            self.stream.write(self.line() + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
