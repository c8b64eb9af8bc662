"""Training throughput: steady-state tokens/s beside wall-clock tokens/s.

A compiled run spends its first steps compiling, and may compile again later (a new input shape,
a guard that changed); evaluation, checkpoints and telemetry steps (eager, see
fp8train.numerics.fp8_telemetry_step) take time that is not training at the compiled speed. So
the summary reports two figures:

    tokens_per_s        steady state: tokens / seconds over the optimizer steps that are neither
                        this session's first step (warm-up), nor a step during which torch.compile
                        compiled anything, nor a telemetry step; MFU uses this figure
    tokens_per_s_wall   tokens trained in this session / wall time of the training loop, all of
                        the above included (what a user waits for)
    tokens_per_s_median tokens of a step / the median steady step: the figure benchmarks compare,
                        since one slow step (a host hiccup, an allocator resize) moves a mean over
                        ten steps by percents (1B hybrid on an H200: mean 102k, profiled steps 111k)

and how many steps each exclusion took. Compilations are counted by Dynamo's compile callbacks
(new frames, lazily compiled backward graphs, CUDA-graph recordings), so a recompile in the middle
of a run is caught, not only the first one.
"""

from __future__ import annotations

import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

PHASE_PREFIX = "fp8train."


def phase(name: str):
    """A named range of the training step (forward, backward, optimizer, fp8 update, step guard)
    that torch.profiler records; benchmarks/idle_gaps.py files the GPU's idle time under it. A
    few microseconds of host time when no profiler runs."""
    return torch.profiler.record_function(PHASE_PREFIX + name)


class CompileWatch:
    """Counts torch.compile compilations (and their seconds) while it is open."""

    def __init__(self):
        self.count, self.seconds, self._started = 0, 0.0, None
        self._handler = _compile_callback_handler()
        if self._handler is not None:
            self._handler.register_start_callback(self._on_start)
            self._handler.register_end_callback(self._on_end)

    def _on_start(self, *_args) -> None:
        self._started = time.perf_counter()

    def _on_end(self, *_args) -> None:
        self.count += 1
        if self._started is not None:
            self.seconds += time.perf_counter() - self._started
            self._started = None

    def close(self) -> None:
        if self._handler is not None:
            for remove, callback in ((self._handler.remove_start_callback, self._on_start),
                                     (self._handler.remove_end_callback, self._on_end)):
                try:
                    remove(callback)
                except ValueError:
                    pass
            self._handler = None


def _compile_callback_handler():
    try:
        from torch._dynamo.callback import callback_handler  # noqa: PLC0415
    except ImportError:  # an older torch: compilations are then not detected (steps stay counted)
        return None
    return callback_handler


@dataclass
class StepTiming:
    seconds: float = 0.0
    tokens: int = 0
    excluded: str | None = None  # why the step is not steady state: warmup | compile | telemetry

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


EXCLUSIONS = ("warmup", "compile", "telemetry")


@dataclass
class Throughput:
    """Per-step timings of one session; `summary()` gives the two figures and the exclusions."""

    steps: list[StepTiming] = field(default_factory=list)
    watch: CompileWatch = field(default_factory=CompileWatch)
    loop_started: float | None = None

    def start_loop(self) -> None:
        self.loop_started = time.perf_counter()

    @contextmanager
    def step(self, tokens: int, telemetry: bool = False):
        """Time one optimizer step of `tokens` tokens (the block is the step)."""
        if self.loop_started is None:
            self.start_loop()
        compiles = self.watch.count
        timing = StepTiming(tokens=tokens)
        started = time.perf_counter()
        yield timing
        timing.seconds = time.perf_counter() - started
        if not self.steps:
            timing.excluded = "warmup"
        elif self.watch.count != compiles:
            timing.excluded = "compile"
        elif telemetry:
            timing.excluded = "telemetry"
        self.steps.append(timing)

    def summary(self) -> dict:
        steady = [s for s in self.steps if s.excluded is None]
        seconds = sum(s.seconds for s in steady)
        wall = time.perf_counter() - self.loop_started if self.loop_started is not None else 0.0
        tokens = sum(s.tokens for s in self.steps)
        median = statistics.median(s.seconds for s in steady) if steady else 0.0
        return {
            "tokens_per_s": sum(s.tokens for s in steady) / seconds if seconds > 0 else None,
            "tokens_per_s_median": steady[0].tokens / median if median > 0 else None,
            "tokens_per_s_wall": tokens / wall if wall > 0 else None,
            "steady_steps": len(steady),
            "excluded_steps": {why: sum(s.excluded == why for s in self.steps) for why in EXCLUSIONS},
            "compile_events": self.watch.count,
            "compile_seconds": round(self.watch.seconds, 3),
        }


def compared_rate(summary: dict) -> float:
    """The figure benchmarks compare: tokens/s of the median steady step (the steady mean for a
    summary written before the median existed; 0 when neither is there)."""
    return summary.get("tokens_per_s_median") or summary.get("tokens_per_s") or 0.0
