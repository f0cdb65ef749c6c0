"""Side-by-side timing for the benchmark scripts: candidates run round-robin in one process, medians over repeats.

On a shared machine the load changes while a benchmark runs; interleaving the candidates (A, B, C, A, B, C, ...)
exposes all of them to the same load, and the median of each candidate's repeats drops the outliers. Ratios of
these medians are what the scripts report.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable

CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}


def interleaved_medians(
    fns: dict[str, Callable[[], object]], *, repeats: int, warmup: int = 2, clock: str = "cpu"
) -> dict[str, float]:
    """Median seconds of each function over ``repeats`` round-robin rounds after ``warmup`` untimed rounds.

    ``clock="cpu"`` (default) counts the CPU time of this process (all its threads): on a machine shared with other
    jobs it does not count the time the process waited for a core, which wall time (``"wall"``) does.
    """
    now = CLOCKS[clock]
    times: dict[str, list[float]] = {name: [] for name in fns}
    for round_ in range(warmup + repeats):
        for name, fn in fns.items():
            start = now()
            fn()
            if round_ >= warmup:
                times[name].append(now() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def load_average() -> float:
    """The 1-minute load average (how busy the shared machine was)."""
    return round(os.getloadavg()[0], 2)
