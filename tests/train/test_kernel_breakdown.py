"""benchmarks/kernel_breakdown.py on rows of a real profiler table (1B hybrid, compiled, on an H200:
benchmarks/results/h200_session5/e2e_runs.tgz, e2e/1b_hybrid/kernels.txt, header and footer kept)."""

from pathlib import Path

import pytest

from benchmarks import kernel_breakdown

SAMPLE = Path(__file__).with_name("kernels_1b_hybrid_h200.txt")


def test_self_cuda_column_and_kinds():
    rows = dict(kernel_breakdown.self_cuda_ms(SAMPLE))
    assert len(rows) == 7  # header, rule lines and the two "time total" footers are not rows
    assert rows["nvjet_sm90_qrtst_128x160_128x5_1x2_h_bz_coopA_algo2_..."] == pytest.approx(80.982)
    assert rows["Memset (Device)"] == pytest.approx(3.095)  # 0.994us avg: Self CUDA, not an average
    totals = kernel_breakdown.breakdown(SAMPLE)
    assert totals["gemm fp8"] == pytest.approx(80.982)
    assert totals["gemm bf16"] == pytest.approx(72.042)
    assert totals["attention"] == pytest.approx(75.231)
    assert totals["fp8 cast"] == pytest.approx(26.123)
    assert totals["optimizer"] == pytest.approx(20.344)
    assert totals["other triton"] == pytest.approx(4.039)
    assert totals["memory"] == pytest.approx(3.095)
    assert totals["aten"] == 0.0


def test_kind_names():
    assert kernel_breakdown.kind("experts_kernel") == "gemm fp8"
    assert kernel_breakdown.kind("void cutlass::Kernel2<cutlass_75_tensorop_bf16_s1688...") == "gemm bf16"
    assert kernel_breakdown.kind("triton_poi_fused_mul_quantize_1x128_both_silu_silu_b...") == "fp8 cast"
    assert kernel_breakdown.kind("_quantize_1x128_both_kernel") == "fp8 cast"
    assert kernel_breakdown.kind("void at::native::vectorized_elementwise_kernel<4, at...") == "aten"


def test_table_and_cli(tmp_path, capsys):
    run = tmp_path / "1b_hybrid"
    run.mkdir()
    (run / "kernels.txt").write_text(SAMPLE.read_text())
    assert kernel_breakdown.main([str(run / "kernels.txt")]) == 0
    out = capsys.readouterr().out
    assert "| kind | 1b_hybrid |" in out and "| gemm fp8 | 81.0 |" in out and "| total | 281.9 |" in out
    assert kernel_breakdown.main([str(tmp_path / "missing.txt")]) == 2
