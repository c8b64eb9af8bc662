"""Steady-state vs wall-clock tokens/s: which steps count, and compilations caught mid-run."""

import time

import torch

from fp8train.train.throughput import Throughput


def _compile_something(k: int):
    torch.compile(lambda x: x * k + 1, backend="eager")(torch.ones(3))


def test_steady_state_excludes_warmup_compile_and_telemetry_steps():
    meter = Throughput()
    try:
        plan = [("warmup", 0.03, False, False), (None, 0.01, False, False), ("compile", 0.01, True, False),
                (None, 0.01, False, False), ("telemetry", 0.03, False, True), (None, 0.01, False, False)]
        for _, seconds, compiles, telemetry in plan:
            with meter.step(100, telemetry):
                if compiles:
                    _compile_something(len(meter.steps))
                time.sleep(seconds)
        time.sleep(0.05)  # e.g. an evaluation: wall clock only
        summary = meter.summary()
    finally:
        meter.watch.close()
    assert [s.excluded for s in meter.steps] == [why for why, *_ in plan]
    assert summary["steady_steps"] == 3
    assert summary["excluded_steps"] == {"warmup": 1, "compile": 1, "telemetry": 1}
    steady = [s for s in meter.steps if s.excluded is None]
    assert summary["tokens_per_s"] == 300 / sum(s.seconds for s in steady)
    assert summary["tokens_per_s_median"] == 100 / sorted(s.seconds for s in steady)[1]
    assert summary["tokens_per_s_wall"] < 600 / 0.15 < summary["tokens_per_s"]
    assert summary["compile_events"] >= 1 and summary["compile_seconds"] > 0


def test_no_steady_step_gives_none_not_a_made_up_number():
    meter = Throughput()
    with meter.step(10):
        pass
    meter.watch.close()
    assert meter.summary()["tokens_per_s"] is None and meter.summary()["steady_steps"] == 0


def test_closed_watch_stops_counting():
    meter = Throughput()
    meter.watch.close()
    _compile_something(7)
    assert meter.watch.count == 0


def test_run_summary_reports_both_figures(short_run):
    """A real 2-step run (conftest's short_run): step 1 is warm-up, step 2 the steady state."""
    from tests.train.helpers import summary

    result = summary(short_run)
    assert result["steady_steps"] == 1 and result["excluded_steps"]["warmup"] == 1
    assert result["tokens_per_s"] > 0 and result["tokens_per_s_wall"] > 0
    assert result["tokens_per_s_wall"] < result["tokens_per_s"], "wall clock includes warm-up, eval, saving"
