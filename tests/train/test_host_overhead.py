"""Issue #12: a run whose model has no FP8 layer does exactly the BF16 step.

benchmarks/host_overhead.py builds the real trainer (tiny model) for recipe bf16, for the hybrid
recipe with a precision policy that keeps every layer in BF16, and for hybrid with every layer in
FP8, and counts per optimizer step: torch operator calls (a TorchDispatchMode), those inside the
trainer's bookkeeping, calls of the FP8 per-step hooks (after_optimizer_step, set_fp8_telemetry,
invalidate_weight_caches) and Python function calls (cProfile). Counts, never times."""

import json
import subprocess
import sys

import pytest

from tests.train.helpers import REPO, clean_env

pytestmark = pytest.mark.slow


def test_no_fp8_layer_run_does_the_bf16_step():
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "host_overhead.py"), "--ops-only",
                             "--layers", "2", "--runs", "bf16", "hybrid:none", "hybrid:all"],
                            cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    counts = json.loads(result.stdout.strip().splitlines()[-1])
    bf16, none, fp8 = counts["bf16"], counts["hybrid:none"], counts["hybrid:all"]
    assert none["fp8_layers"] == 0 and fp8["fp8_layers"] == 14
    assert bf16["fp8_hook_calls"] == none["fp8_hook_calls"] == 0  # no FP8 hook runs without FP8 state
    assert fp8["fp8_hook_calls"] >= 1  # the meter does see them when there is FP8 state
    for key in ("ops", "hook_ops", "py_calls"):  # the same host work, operator for operator
        assert none[key] == bf16[key], (key, none, bf16)
    assert fp8["ops"] > bf16["ops"]
