"""A blockwise GEMM with an E5M2 operand (recipes/v3_fp8_blockwise.yaml) on the scaled_mm backend.

cuBLAS's 1x128 / 128x128 scaling rejects E5M2 ("Invalid scaling configuration", H200, torch 2.11),
so ScaledMMBackend computes these GEMMs from the dequantized operands in BF16. The codes and scales
are the recipe's; the result differs from the exact product of the dequantized operands only by
BF16 rounding of each operand (2^-9 relative) and of the output.
"""

import pytest
import torch

from fp8train.numerics.gemm_backends import EmulatedBackend, ScaledMMBackend
from fp8train.quant import reference
from fp8train.quant.formats import E4M3, E5M2
from fp8train.quant.granularity import Granularity


@pytest.mark.parametrize("a_fmt,b_fmt,b_block", [(E5M2, E4M3, True), (E4M3, E5M2, False), (E5M2, E5M2, False)])
def test_e5m2_blockwise_gemm_is_the_dequantized_product(a_fmt, b_fmt, b_block):
    torch.manual_seed(0)
    x, w = torch.randn(256, 384) * 3, torch.randn(128, 384) * 0.05
    a = reference.quantize(x, a_fmt, Granularity.tile(128))
    b = reference.quantize(w, b_fmt, Granularity.block(128) if b_block else Granularity.tile(128))
    exact = a.dequantize().double() @ b.dequantize().double().t()
    for out_dtype in (torch.float32, torch.bfloat16):
        got = ScaledMMBackend().mm(a, b, out_dtype)
        assert got.dtype == out_dtype and got.shape == (256, 128)
        rel = ((got.double() - exact).norm() / exact.norm()).item()
        assert rel < 4e-3, f"{a_fmt.name} x {b_fmt.name}: rel err {rel:.2e} vs the dequantized product"
    emulated = EmulatedBackend().mm(a, b, torch.float32)
    assert ((emulated.double() - exact).norm() / exact.norm()).item() < 1e-6


def test_the_backend_reason_says_which_gemms_run_in_bf16():
    from fp8train.numerics import load_recipe
    from fp8train.numerics.gemm_backends import dense_fallback_note
    note = dense_fallback_note(load_recipe("v3_fp8_blockwise"))
    assert "E5M2 operand (input)" in note and "BF16" in note
    assert dense_fallback_note(load_recipe("blockwise")) == ""  # E4M3 everywhere: cuBLAS takes it
    assert dense_fallback_note(load_recipe("v3_fp8")) == ""  # tensorwise: E5M2 is fine
