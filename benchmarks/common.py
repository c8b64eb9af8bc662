"""Shared benchmark helpers: CUDA-event timing (median of repeats) and table printing.

Benchmarks never assert on time; they print a table and optionally write JSON.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch

from fp8train.numerics.calibration import cuda_time_ms  # noqa: F401 (the benchmarks' CUDA-event timer)


def time_ms(fn, repeats: int, warmup: int = 3) -> float:
    """CUDA-event median on the GPU; wall-clock median on the CPU (the benchmarks' --dry-run)."""
    if torch.cuda.is_available():
        return cuda_time_ms(fn, warmup=warmup, repeats=repeats)
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def host_time_us(fn, calls: int, repeats: int = 5, warmup: int = 10) -> float:
    """Median over `repeats` of the host (Python wall) time per call, `calls` calls back to back
    with no synchronisation inside the loop: what the host spends issuing the work."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) / calls * 1e6)
    torch.cuda.synchronize()
    return statistics.median(times)


def gpu_busy_ns(prof) -> int:
    """Nanoseconds the GPU was busy in a torch.profiler trace: the union of its kernel and copy
    intervals (overlapping streams count once)."""
    intervals = sorted((e.start_ns(), e.start_ns() + e.duration_ns()) for e in prof.profiler.kineto_results.events()
                       if e.device_type() == torch.autograd.DeviceType.CUDA and e.duration_ns() > 0)
    busy, end = 0, None
    for start, stop in intervals:
        if end is None or start > end:
            busy, end = busy + stop - start, stop
        elif stop > end:
            busy, end = busy + stop - end, stop
    return busy


def print_table(rows: list[dict], columns: list[str]) -> str:
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns}
    lines = ["| " + " | ".join(c.ljust(widths[c]) for c in columns) + " |",
             "|" + "|".join("-" * (widths[c] + 2) for c in columns) + "|"]
    lines += ["| " + " | ".join(str(r.get(c, "")).ljust(widths[c]) for c in columns) + " |" for r in rows]
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def write_json(path: str | None, payload) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=2))


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def speedup_or_error(baseline_ms: float, time_fn) -> str:
    """'1.62x', or the error in a few words: one failing variant must not lose the whole table."""
    try:
        return f"{baseline_ms / time_fn():.2f}x"
    except Exception as exc:  # a backend that cannot run this shape/recipe: say so in the cell
        torch.cuda.synchronize()
        return f"error: {type(exc).__name__}: {str(exc)[:60]}"
