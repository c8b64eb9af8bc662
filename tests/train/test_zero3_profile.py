"""benchmarks/zero3_profile.py (issue 18's GPU diagnosis) on the CPU: the tiny model under ZeRO-3
in its own process; its counts are real (ZeRO-3 fetches, one FP8 weight cast per layer per step),
its times are not looked at."""

import json
import subprocess
import sys

import pytest

from tests.train.helpers import REPO, clean_env

pytestmark = pytest.mark.slow

TINY = ["trainer.device=cpu", "data.seq_len=32", "data.val_batches=1", "data.val_batch_size=2",
        "trainer.micro_batch_size=2", "trainer.global_batch_size=4"]


def test_zero3_profile_counts_on_cpu(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "zero3_profile.py"), "--size", "tiny",
                             "--runs", "hybrid:3", "--steps", "1", "--warmup", "1", "--out", str(tmp_path),
                             "--extra", *TINY], cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    rows = {r["run"]: r for r in json.loads((tmp_path / "zero3_profile.json").read_text())}
    hybrid = rows["hybrid:3"]
    assert hybrid["fetches"] > 0 and hybrid["fp8_layers"] == 14
    assert hybrid["casts/layer"] == "1-1"  # one weight cast per FP8 layer per optimizer step
    assert hybrid["top_ops"] and "top operators" in result.stdout


def test_zero3_profile_rejects_a_bad_run_name():
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "zero3_profile.py"), "--runs", "hybrid"],
                            cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "expected recipe:zero_stage" in result.stderr
