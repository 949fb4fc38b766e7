"""Timing shared by the benchmarks: the best of several runs, the figure least disturbed by
whatever else the machine is doing."""
from __future__ import annotations

import time
from collections.abc import Callable


def best_ms(run: Callable[[], object], repeat: int = 5) -> float:
    """The fastest of `repeat` calls of `run`, in milliseconds."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times) * 1000
