"""benchmarks/bench_e2e.py's CPU logic: runs through the trainer in one process, rows, ratios, the
policy report and the merged table of several invocations (tiny model, no GPU numbers)."""

import json
import subprocess
import sys

import pytest

from tests.train.helpers import REPO, clean_env

pytestmark = pytest.mark.slow
TINY = ["--steps", "2", "--profile-steps", "0", "--extra", "data.seq_len=32", "trainer.micro_batch_size=4",
        "trainer.global_batch_size=8"]


def _bench(out, *args):
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_e2e.py"), "--out", str(out), *args],
                            cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return result.stdout


def test_rows_ratio_policy_report_and_merged_table(tmp_path):
    _bench(tmp_path, "--runs", "tiny:bf16", "tiny:hybrid:off", *TINY)
    _bench(tmp_path, "--runs", "tiny:current", "--budget-s", "0", *TINY)  # skipped, still a row
    table = _bench(tmp_path, "--report-only")
    assert "| tiny | bf16 " in table and "1.00x" in table and "skipped: time budget" in table
    row = json.loads((tmp_path / "tiny_hybrid_policy_off.json").read_text())
    assert row["status"] == "ok" and row["fp8_layers"] == 14 and row["summary"]["steady_steps"] == 1
    assert row["summary"]["tokens_per_s"] > 0 and row["gpu_busy"] is None  # CPU: no profile
    assert row["summary"]["final_train_loss"] is None  # no step was logged: None, not a NaN that reads as divergence
    assert json.loads((tmp_path / "bench_e2e.json").read_text())["rows"][1]["vs_bf16"].endswith("x")


def test_isolated_repeats_run_one_process_each_and_report_the_median(tmp_path):
    out = _bench(tmp_path, "--isolate", "--repeats", "2", "--runs", "tiny:bf16", *TINY)
    rows = [json.loads((tmp_path / f"tiny_bf16_r{i}.json").read_text()) for i in (1, 2)]
    assert all(r["status"] == "ok" and r["summary"]["tokens_per_s"] > 0 for r in rows)
    assert out.count("device:") == 3  # the parent and one process per run
    merged = json.loads((tmp_path / "bench_e2e.json").read_text())
    assert len(merged["runs"]) == 2 and len(merged["rows"]) == 1
    assert merged["rows"][0]["runs"] == 2 and merged["rows"][0]["spread"].endswith("%")
