"""Shared benchmark machinery: shapes per device, peak-memory measurement, machine metadata.

Peak memory (bytes above what was allocated before the call):
- GPU: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``.
- CPU: the kernel's high-water mark of this process's resident set (VmHWM), reset through
  ``/proc/self/clear_refs`` just before the call, minus the resident set at that moment. glibc is told
  to return every allocation above 128 KiB to the OS on free (``mallopt``), so memory freed by the
  warm-up does not hide the call's own peak. Includes everything the call allocates (logits,
  workspaces, gradients), measured on the second call (after compilation and warm-up).
"""

from __future__ import annotations

import ctypes
import datetime
import gc
import os
import platform
import statistics
import time

import pytest
import torch

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"

try:
    _libc = ctypes.CDLL("libc.so.6")
    _libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD: large blocks are mmap'd and unmapped on free
except OSError:  # pragma: no cover - not glibc
    _libc = None


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def peak_memory_bytes(fn) -> int | None:
    """Peak extra memory of one call of ``fn`` (see the module docstring), or None if unmeasurable."""
    gc.collect()
    if CUDA:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    try:
        if _libc is not None:
            _libc.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _status_kb("VmRSS")
        fn()
        return (_status_kb("VmHWM") - base) * 1024
    except OSError:
        return None


def device_name() -> str:
    if CUDA:
        return torch.cuda.get_device_name()
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU {cpu}, {torch.get_num_threads()} threads"


def machine_info() -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    return {"device": device_name(), "torch": torch.__version__, "triton": triton_version,
            "date": datetime.date.today().isoformat(), "host_cores": os.cpu_count()}


def _timed(fn) -> float:
    """Seconds of one call (every benchmark callable returns only when its device is done)."""
    if CUDA:
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run_benchmark(benchmark, factory, case, *, op: str, impl: str, flops: float | None, rounds: int,
                  extra: dict | None = None, floor=None):
    """Times ``factory(case)`` with pytest-benchmark; with ``floor`` (the GEMM floor's factory), the floor is
    timed right before every round of it (round-robin: clock and temperature drift hit both alike, which a
    floor timed minutes apart in its own test would not), and its median goes into ``floor_median``."""
    from impls import Unavailable

    try:
        fn = factory(case)
        fn()  # warm-up: compilation, autotuning, allocator growth
    except Unavailable as why:
        pytest.skip(f"{impl}: {why}")
    except torch.OutOfMemoryError:  # the full-logits peers at the largest shapes: a result in itself
        fn = None
        gc.collect()
        if CUDA:
            torch.cuda.empty_cache()
        pytest.skip(f"{impl}: out of memory at {case.label}")
    benchmark.group = f"{op} {case.label}"
    peak = peak_memory_bytes(fn)
    benchmark.extra_info.update(op=op, impl=impl, case=case.label, flops=flops, peak_mem_bytes=peak,
                                **(extra or {}), **machine_info())
    floor_times = []

    def time_floor():  # built per round and dropped: its operands (a [N, V] dZ) never sit beside the call's
        step = floor(case)
        floor_times.append(_timed(step))

    if floor is not None and floor is not factory:
        floor(case)()  # warm-up
        benchmark.pedantic(fn, setup=time_floor, rounds=rounds, warmup_rounds=0, iterations=1)
        benchmark.extra_info["floor_median"] = statistics.median(floor_times)
    else:
        benchmark.pedantic(fn, rounds=rounds, warmup_rounds=0, iterations=1)
    _append_row(op, impl, case.label, benchmark, peak)


def _append_row(op, impl, case, benchmark, peak):
    """With BENCH_ROWS=path, one JSON line per finished benchmark: a run cut off by a timeout keeps the rows it
    finished (pytest-benchmark writes its JSON only at the end of the session)."""
    path = os.environ.get("BENCH_ROWS")
    stats = getattr(getattr(benchmark, "stats", None), "stats", None)
    if not path or stats is None:
        return
    import json

    floor = benchmark.extra_info.get("floor_median")
    row = dict(op=op, impl=impl, case=case, median_ms=stats.median * 1e3, min_ms=stats.min * 1e3,
               rounds=len(stats.data), peak_gib=None if peak is None else peak / 2**30,
               floor_median_ms=None if floor is None else floor * 1e3)
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


@pytest.fixture(autouse=True)
def _no_grad_leaks():
    yield
    gc.collect()
