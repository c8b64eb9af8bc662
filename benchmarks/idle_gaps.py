"""Where the GPU waits: its idle gaps in a profiled training step, and what the host was doing.

A compiled 1B FP8 step replayed as CUDA graphs keeps the GPU busy 91 % of the time (hybrid)
against BF16's 96 % (benchmarks/results/h200_session12). The kernels are the same as the
current recipe's, so the difference is host time: some host work the GPU waits for. This module
turns one torch.profiler trace (CPU and CUDA activity) into two tables:

    by phase   the trainer's step phases (`fp8train.*` ranges: forward, backward, optimizer,
               fp8 update; fp8train/train/trainer.py) and the idle GPU time that started in each
    by host op the host operations running during the gaps (CUDA runtime calls such as
               cudaStreamSynchronize or cudaGraphLaunch, aten ops, compiled regions), by overlap

A gap is an interval of at least `min_gap_us` with no kernel or copy on any stream. Everything is
plain interval arithmetic on (start_ns, end_ns, name) triples, so the CPU tests feed it synthetic
traces; `from_profile` reads a real one.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import defaultdict

from fp8train.train.throughput import PHASE_PREFIX
OUTSIDE = "(outside the step phases)"


def busy_union(intervals: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The union of [start, end) intervals, sorted and merged."""
    merged: list[list[int]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(a, b) for a, b in merged]


def idle_gaps(gpu: list[tuple[int, int]], min_gap_ns: int, window: tuple[int, int] | None = None
              ) -> list[tuple[int, int]]:
    """Intervals of at least `min_gap_ns` between GPU activity (inside `window` when given: the
    time before the first and after the last kernel counts as idle too)."""
    if window:  # only what ran inside the window; the rest of the window is idle
        gpu = [(max(s, window[0]), min(e, window[1])) for s, e in gpu if e > window[0] and s < window[1]]
    busy = busy_union(gpu)
    edges = [window[0]] if window else []
    points = edges + [t for interval in busy for t in interval] + ([window[1]] if window else [])
    if not window:
        points = points[1:-1] if points else []
    gaps = []
    for start, end in zip(points[::2], points[1::2]):
        if end - start >= min_gap_ns:
            gaps.append((start, end))
    return gaps


def _overlap(a: tuple[int, int], b: tuple[int, int]) -> int:
    return max(0, min(a[1], b[1]) - max(a[0], b[0]))


def attribute(gaps: list[tuple[int, int]], cpu: list[tuple[int, int, str]]) -> dict:
    """{'by_phase': {phase: [idle_ns, gaps]}, 'by_op': {op: overlap_ns}, 'idle_ns': total}.

    A gap belongs to the innermost `fp8train.*` range that contains its start (where the host was
    when the GPU ran dry). Host operations are credited with their overlap with the gaps; nested
    operations are each credited (an aten op and the runtime call inside it both show)."""
    phases = [(s, e, n) for s, e, n in cpu if n.startswith(PHASE_PREFIX)]
    ops = [(s, e, n) for s, e, n in cpu if not n.startswith(PHASE_PREFIX)]
    # a real step has tens of thousands of host events: the long ones (over `long_ns`) are checked
    # against every gap, the short ones only where they can overlap it (a sorted window)
    long_ns = 1_000_000
    long_ops = [op for op in ops if op[1] - op[0] > long_ns]
    short_ops = sorted(op for op in ops if op[1] - op[0] <= long_ns)
    starts = [op[0] for op in short_ops]
    by_phase: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    by_op: dict[str, int] = defaultdict(int)
    for gap in gaps:
        holders = [(e - s, n) for s, e, n in phases if s <= gap[0] < e]
        phase = min(holders)[1] if holders else OUTSIDE
        by_phase[phase][0] += gap[1] - gap[0]
        by_phase[phase][1] += 1
        nearby = short_ops[bisect_left(starts, gap[0] - long_ns):bisect_left(starts, gap[1])]
        for s, e, n in long_ops + nearby:
            shared = _overlap(gap, (s, e))
            if shared:
                by_op[n] += shared
    return {"by_phase": dict(by_phase), "by_op": dict(by_op), "idle_ns": sum(e - s for s, e in gaps)}


def report(result: dict, wall_ns: int, top: int = 12) -> str:
    """The two tables as text (ms over the profiled steps; shares of the wall time)."""
    lines = [f"GPU idle {result['idle_ns'] / 1e6:.1f} ms of {wall_ns / 1e6:.1f} ms wall "
             f"({result['idle_ns'] / max(wall_ns, 1):.1%}), by the step phase it started in:",
             "| phase | idle ms | share of wall | gaps |", "|---|---|---|---|"]
    for name, (ns, count) in sorted(result["by_phase"].items(), key=lambda kv: -kv[1][0]):
        lines.append(f"| {name} | {ns / 1e6:.2f} | {ns / max(wall_ns, 1):.1%} | {count} |")
    lines += ["", "host operations during the gaps (overlap; nested operations each counted):",
              "| host op | ms |", "|---|---|"]
    for name, ns in sorted(result["by_op"].items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"| {name[:90]} | {ns / 1e6:.2f} |")
    return "\n".join(lines)


def from_profile(prof, min_gap_us: float = 20.0) -> tuple[dict, int]:
    """(attribution, wall ns) from a torch.profiler.profile run with CPU and CUDA activity."""
    import torch  # noqa: PLC0415

    gpu, cpu = [], []
    for e in prof.profiler.kineto_results.events():
        span = (e.start_ns(), e.start_ns() + e.duration_ns())
        if e.device_type() == torch.autograd.DeviceType.CUDA:
            if e.duration_ns() > 0:
                gpu.append(span)
        else:
            cpu.append((*span, e.name()))
    if not gpu or not cpu:
        return {"by_phase": {}, "by_op": {}, "idle_ns": 0}, 0
    window = (min(s for s, _, n in cpu if n.startswith(PHASE_PREFIX)) if any(
        n.startswith(PHASE_PREFIX) for *_, n in cpu) else min(s for s, _ in gpu), max(e for _, e in gpu))
    gaps = idle_gaps(gpu, int(min_gap_us * 1e3), window)
    return attribute(gaps, cpu), window[1] - window[0]
