"""benchmarks/bench_inference.py's CPU logic (--dry-run: interpreter, tiny shapes, no GPU numbers):
parts run in the order given, an unknown part is named, tables land on disk."""

import json
import subprocess
import sys

from tests.train.helpers import REPO, clean_env


def _bench(out, *args):
    env = {**clean_env(), "TRITON_INTERPRET": "1"}
    return subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_inference.py"), "--dry-run",
                           "--out", str(out), "--max-configs", "1", *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def test_parts_in_the_given_order_and_json_on_disk(tmp_path):
    result = _bench(tmp_path, "--parts", "decode")
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert "### decode" in result.stdout and "### gemm" not in result.stdout
    tables = json.loads((tmp_path / "bench_inference.json").read_text())["tables"]
    assert list(tables) == ["decode"] and {row["weights"] for row in tables["decode"]} >= {"bf16", "w4a16"}


def test_unknown_part_is_named(tmp_path):
    result = _bench(tmp_path, "--parts", "decode,attention")
    assert result.returncode != 0 and "unknown part 'attention'" in result.stderr


def test_decode_gemv_columns_and_tuned_gemv_config(tmp_path):
    """--max-configs 0: only the decode GEMV is measured, so it wins and lands in tuned.json."""
    result = _bench(tmp_path, "--parts", "gemm", "--ms", "1", "--variants", "W4A16", "--max-configs", "0",
                    "--max-gemv", "1")
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    row = json.loads((tmp_path / "bench_inference.json").read_text())["tables"]["gemm"][0]
    assert row["W4A16 gemm"] == "none verified" and "gemv_" in row["W4A16 gemv"] and "W8A16" not in row
    tuned = json.loads((tmp_path / "tuned.json").read_text())["configs"]
    assert [v["kernel"] for v in tuned.values()] == ["gemv"]


def test_unknown_shape_is_named(tmp_path):
    result = _bench(tmp_path, "--parts", "gemm", "--shapes", "1b qkv,70b up")
    assert result.returncode != 0 and "unknown '70b up'" in result.stderr
