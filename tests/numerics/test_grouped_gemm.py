"""The grouped GEMMs of the FP8 grouped layer on CPU: one call per GEMM family for all experts.

* The kernel path (the scaled_mm backend's grouped methods -> kernels.grouped_mm_*, here through
  the Triton interpreter) computes what the emulated backend computes, for every tensorwise pair of
  formats and for blockwise, with ragged groups and experts without tokens, in exactly three
  grouped calls per forward+backward.
* The emulation's traced form (no host read of the offsets: each expert's product masked) agrees
  with its eager host form, and both follow the kernels' semantics at the edges.
* The stacked weight operands are views of one cast (no per-expert copy).
"""

import copy

import pytest
import torch

import kernels
from fp8train.nn.grouped_linear import GroupedLinear
from fp8train.numerics import FP8GroupedLinear, after_optimizer_step, load_recipe, recipe_from_dict
from fp8train.numerics import grouped_gemm
from fp8train.numerics.gemm_backends import ScaledMMBackend
from fp8train.numerics.grouped_gemm import emulated_experts, emulated_tokens, stack_weight
from fp8train.quant import E4M3, Granularity
from fp8train.quant.reference import quantize
from tests.numerics.helpers import grouped_fwd_bwd

IN, OUT = 128, 256
SIZES = [[0, 3, 17, 50], [70, 0, 0, 0], [16, 16, 0, 38]]
RECIPES = ["hybrid", "current", "v3_fp8", "e4m3_current", "blockwise"]
CASES = [(name, SIZES[0]) for name in RECIPES] + [("hybrid", SIZES[1]), ("blockwise", SIZES[2])]
E4M3_CURRENT = recipe_from_dict({"name": "e4m3_current", "input": {"format": "e4m3", "scaling": "current"},
                                 "weight": {"format": "e4m3", "scaling": "current"},
                                 "grad_output": {"format": "e4m3", "scaling": "current"}})
GROUPED_OPS = ("grouped_mm_experts_tensorwise", "grouped_mm_experts_blockwise", "grouped_mm_tokens_tensorwise",
               "grouped_mm_tokens_blockwise")


def recipe_by_name(name):
    return E4M3_CURRENT if name == "e4m3_current" else load_recipe(name)


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def count_kernel_calls(monkeypatch) -> list[str]:
    calls = []
    for name in GROUPED_OPS:
        def counting(*args, _name=name, _op=getattr(kernels, name), **kwargs):
            calls.append(_name)
            return _op(*args, **kwargs)
        monkeypatch.setattr(kernels, name, counting)
    return calls


@pytest.mark.parametrize("recipe_name, sizes", CASES)
def test_kernel_path_matches_the_emulation_in_three_grouped_calls(monkeypatch, recipe_name, sizes):
    torch.manual_seed(0)
    emulated = FP8GroupedLinear.from_grouped(GroupedLinear(len(sizes), IN, OUT), recipe_by_name(recipe_name),
                                             backend="emulated")
    kernel = copy.deepcopy(emulated)
    kernel.backend = ScaledMMBackend()  # its grouped GEMMs: kernels.grouped_mm_* (the interpreter here)
    calls = count_kernel_calls(monkeypatch)
    x, dy = torch.randn(sum(sizes), IN), torch.randn(sum(sizes), OUT)
    delayed = recipe_name in ("hybrid", "v3_fp8")
    for step in range(2 if delayed else 1):  # delayed: step 1 runs with the scales step 0 recorded
        reference = grouped_fwd_bwd(emulated, x, dy, sizes)
        assert not calls
        actual = grouped_fwd_bwd(kernel, x, dy, sizes)
        family = "blockwise" if recipe_name == "blockwise" else "tensorwise"
        assert sorted(calls) == sorted([f"grouped_mm_experts_{family}"] * 2 + [f"grouped_mm_tokens_{family}"])
        calls.clear()
        for gemm, a, b in zip(("output", "grad_input", "grad_weight"), actual, reference):
            assert a.shape == b.shape and a.dtype == b.dtype, gemm
            assert rel_err(a, b) < 1e-5, f"step {step} {gemm}: rel err {rel_err(a, b):.2e}"
        for e in (e for e, size in enumerate(sizes) if size == 0):
            assert torch.equal(actual[2][e], torch.zeros(OUT, IN))
        after_optimizer_step(emulated)
        after_optimizer_step(kernel)


@pytest.mark.parametrize("recipe_name", ["hybrid", "blockwise"])
def test_traced_emulation_matches_the_host_form(monkeypatch, recipe_name):
    sizes = SIZES[0]
    host = FP8GroupedLinear.from_grouped(GroupedLinear(len(sizes), IN, OUT), load_recipe(recipe_name),
                                         backend="emulated")
    masked = copy.deepcopy(host)
    x, dy = torch.randn(sum(sizes), IN), torch.randn(sum(sizes), OUT)
    expected = grouped_fwd_bwd(host, x, dy, sizes)
    monkeypatch.setattr(grouped_gemm, "_reads_offsets_on_host", lambda offs: False)
    for a, b in zip(grouped_fwd_bwd(masked, x, dy, sizes), expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def tensorwise(t):
    return quantize(t, E4M3, Granularity.tensor())


@pytest.mark.parametrize("host", [True, False])
def test_emulation_edges_rows_past_the_end_and_empty_experts(monkeypatch, host):
    monkeypatch.setattr(grouped_gemm, "_reads_offsets_on_host", lambda offs: host)
    a, w = tensorwise(torch.randn(40, 32)), tensorwise(torch.randn(3 * 48, 32))
    w_rows, _ = stack_weight(w, None, 3)
    offs = torch.tensor([10, 10, 30], dtype=torch.int32)  # expert 1 empty, rows 30..39 unowned
    out = emulated_experts(a, w_rows, offs, torch.float32)
    a_hp, w_hp = a.dequantize(), w.dequantize().reshape(3, 48, 32)
    torch.testing.assert_close(out[:10], a_hp[:10] @ w_hp[0].t(), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(out[10:30], a_hp[10:30] @ w_hp[2].t(), rtol=1e-6, atol=1e-5)
    assert torch.equal(out[30:], torch.zeros(10, 48))
    c, d = tensorwise(torch.randn(24, 40)), tensorwise(torch.randn(16, 40))
    grads = emulated_tokens(c, d, offs, torch.float32)
    assert grads.shape == (3, 24, 16) and torch.equal(grads[1], torch.zeros(24, 16))
    c_hp, d_hp = c.dequantize(), d.dequantize()
    torch.testing.assert_close(grads[2], c_hp[:, 10:30] @ d_hp[:, 10:30].t(), rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("recipe_name", ["hybrid", "blockwise"])
def test_stacked_weights_are_views_of_one_cast(recipe_name):
    layer = FP8GroupedLinear.from_grouped(GroupedLinear(3, IN, OUT), load_recipe(recipe_name), backend="emulated")
    w_rows, w_t = layer.fp8_weights()
    assert w_rows.data.shape == (3, OUT, IN) and w_t.data.shape == (3, IN, OUT)
    assert w_t.data.stride() == (OUT, 3 * OUT, 1)  # expert e = columns [e*OUT, (e+1)*OUT) of one W^T
    assert w_rows.data.untyped_storage().data_ptr() != w_t.data.untyped_storage().data_ptr()
    for e in range(3):
        assert torch.equal(w_t.expert(e).dequantize(), w_rows.expert(e).dequantize().t())
    assert layer.weight_casts == 1
