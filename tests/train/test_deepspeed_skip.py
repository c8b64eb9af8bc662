"""Through DeepSpeed: a step with a NaN loss leaves weights, optimizer state and FP8 buffers
untouched, and batches (1, bad, 3) end exactly where batches (1, 3) do. bf16 ZeRO-1 (and 2, and
bf16 stage 0: checked by hand with the worker) skips a non-finite gradient norm on its own; fp32
stage 0 does not and relies on the step guard's optimizer hook (without it this configuration
ends with NaN weights)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.train.helpers import REPO, clean_env

CONFIGS = ("bf16:1", "fp32:0")  # the default (BF16_Optimizer), and one DeepSpeed does not guard


@pytest.mark.slow
def test_a_skipped_step_leaves_no_trace_through_deepspeed():
    result = subprocess.run([sys.executable, str(REPO / "tests" / "train" / "deepspeed_skip_worker.py"),
                             *CONFIGS], cwd=REPO, env=clean_env(), capture_output=True, text=True,
                            timeout=600)
    line = next((l for l in result.stdout.splitlines() if l.startswith("RESULTS ")), None)
    assert line, (result.stdout + result.stderr)[-4000:]
    results = json.loads(line.removeprefix("RESULTS "))
    for config in CONFIGS:
        assert results[config] == {"untouched": True, "differing": []}, (config, results[config])
