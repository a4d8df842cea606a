"""Host time of a call on the CPU, for the scripts that time host work without a GPU (``launch_count.py
--host``, ``launch_host.py``)."""

from __future__ import annotations

import statistics
import time


def host_us(fn, reps: int = 300, warmup: int = 20) -> tuple[float, float]:
    """(median, minimum) microseconds of ``reps`` calls of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6, min(times) * 1e6
