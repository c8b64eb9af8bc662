"""Timing for the inference benchmark: CUDA-graphed calls over rotating copies (HBM, not L2).

A decode step streams every layer's weights from HBM; a micro-benchmark that calls one GEMM on the
same 2-8 MB weight again and again reads it from the 50 MB L2 instead and flatters everyone. So each
variant gets enough copies of its operands to exceed `footprint_mb` (default 192 MB, ~4x the H100's
L2), and the timed graph cycles through them. The graph holds `calls` launches back to back (no host
in the loop, as inside a graphed decode step); the median over replays, divided by `calls`, is the
time per call.

On a CPU (a dry run of the benchmark's logic under TRITON_INTERPRET=1) the same API times one eager
call with the wall clock.
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Callable

import torch


def copies_for(bytes_per_copy: int, footprint_mb: float = 192.0, cap: int = 64) -> int:
    """How many operand copies make the working set exceed the footprint."""
    return max(1, min(cap, math.ceil(footprint_mb * 2**20 / max(bytes_per_copy, 1))))


def time_calls_ms(fns: list[Callable[[], object]], calls: int = 32, replays: int = 7) -> float:
    """Median milliseconds per call of fns[0], fns[1], ... cycled `calls` times in one CUDA graph."""
    if not torch.cuda.is_available():
        start = time.perf_counter()
        fns[0]()
        return (time.perf_counter() - start) * 1e3
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: compiles kernels, allocates workspaces
        for fn in fns[:2]:
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fns[i % len(fns)]()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / calls)
    del graph
    return statistics.median(times)


def best_of(candidates: dict[str, Callable[[], float]]) -> tuple[str | None, float, dict[str, str]]:
    """(best name, its ms, notes per candidate) over candidates that return a time or raise."""
    best, best_ms, notes = None, float("inf"), {}
    for name, run in candidates.items():
        try:
            ms = run()
        except Exception as error:  # one broken config must not lose the table
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            notes[name] = f"error: {type(error).__name__}: {str(error).splitlines()[0][:80]}"
            continue
        notes[name] = f"{ms * 1e3:.1f} us"
        if ms < best_ms:
            best, best_ms = name, ms
    return best, best_ms, notes
