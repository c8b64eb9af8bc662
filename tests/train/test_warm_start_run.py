"""The trainer warm-starts a fresh FP8 run's delayed scales (numerics/warm_start.py), and only a fresh one.

Step 1's gradient norm is the check. With every scale at 1, the card's v3_fp8 recipe (E4M3
gradients, smallest subnormal 2^-9) flushes most of the first backward. The warm-started run's
norm lands next to the BF16 run's.
"""

from __future__ import annotations

import pytest

from tests.train.helpers import check_ok, launch, metrics, output

pytestmark = pytest.mark.slow  # four short launches, ~30 s

RUN = ("trainer.max_steps=2", "trainer.eval_every=2", "trainer.save_every=1")


def _grad_norm(run_dir) -> float:
    return metrics(run_dir)[1]["train/grad_norm"]


def test_fresh_fp8_run_warm_starts_and_a_resumed_one_does_not(tmp_path):
    bf16, warm, cold = tmp_path / "bf16", tmp_path / "warm", tmp_path / "cold"
    check_ok(launch(bf16, "+recipe=bf16", *RUN))
    first = launch(warm, "+recipe=v3_fp8", *RUN)
    check_ok(first)
    assert "FP8 warm start:" in output(first)
    check_ok(launch(cold, "+recipe=v3_fp8", "trainer.fp8_warm_start=false", *RUN))
    reference = _grad_norm(bf16)
    warm_gap, cold_gap = abs(_grad_norm(warm) - reference), abs(_grad_norm(cold) - reference)
    assert warm_gap < 0.1 * reference and warm_gap < cold_gap / 3, (reference, _grad_norm(warm), _grad_norm(cold))
    resumed = launch(warm, "+recipe=v3_fp8", *RUN[1:], "trainer.max_steps=3")
    check_ok(resumed)
    assert "resumed from" in output(resumed) and "FP8 warm start:" not in output(resumed)
