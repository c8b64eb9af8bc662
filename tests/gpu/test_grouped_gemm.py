"""On Hopper: torch._scaled_grouped_mm computes what the per-expert loop of scaled_mm GEMMs computes.

Both see the same FP8 operands (one cast of the padded X and dY, one weight cast), so they may
differ only by FP32 accumulation order: another kernel (CUTLASS grouped vs cuBLAS), another split
of the contraction, and the forward's fast accumulation in both. Relative-norm error < 1e-3.
If support is False on an H100 with torch >= 2.9 the tests FAIL (the fallback would hide a
regression of the fast path); run with -s to see which GEMMs ran grouped for each recipe.
"""

from types import SimpleNamespace

import pytest
import torch
from torch.torch_version import TorchVersion

from fp8train.nn.grouped_linear import GroupedLinear
from fp8train.numerics import FP8GroupedLinear, after_optimizer_step, fp8_gemm_capability
from fp8train.numerics import grouped_gemm, load_recipe, recipe_from_dict
from fp8train.numerics.gemm_backends import ScaledMMBackend
from fp8train.numerics.grouped_linear_function import (
    _expert_gemm_grouped, _expert_gemm_loop, _token_gemm_grouped, _token_gemm_loop)
from fp8train.numerics.grouped_layout import align_groups, scatter_to_padded
from fp8train.numerics.grouped_gemm import GEMMS, group_offsets, grouped_gemm_support, plan_grouped_gemms
from fp8train.quant import E4M3, E5M2, Granularity
from fp8train.quant.reference import quantize_with_scale

ok, why = fp8_gemm_capability()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not ok, reason=why)]

SIZES = [[0, 3, 17, 130, 362], [512, 0, 0, 0, 0], [64, 48, 1, 16, 200]]
E4M3_CURRENT = recipe_from_dict({"name": "e4m3_current", "input": {"format": "e4m3", "scaling": "current"},
                                 "weight": {"format": "e4m3", "scaling": "current"},
                                 "grad_output": {"format": "e4m3", "scaling": "current"}})
EXPECTED_GROUPED = {"hybrid": {"output"}, "current": {"output"}, "v3_fp8": {"grad_input"},
                    "e4m3_current": set(GEMMS)}


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def require_grouped_support():
    ok, why = grouped_gemm_support(E4M3, E4M3)
    print(f"\ngrouped GEMM support: {ok}: {why}")
    if ok:
        return
    major, minor = torch.cuda.get_device_capability()
    if major == 9 and TorchVersion(torch.__version__) >= "2.9":
        pytest.fail(f"torch {torch.__version__} on sm_{major}{minor} should run torch._scaled_grouped_mm "
                    f"but grouped_gemm_support says: {why}")
    pytest.skip(why)


def test_grouped_gemm_support_on_this_gpu():
    require_grouped_support()
    for a, b in ((E4M3, E4M3), (E5M2, E4M3), (E4M3, E5M2)):
        print(a.name, b.name, grouped_gemm_support(a, b))
    assert grouped_gemm_support(E4M3, E4M3)[0]
    assert not grouped_gemm_support(E5M2, E4M3)[0] and not grouped_gemm_support(E4M3, E4M3, torch.float32)[0]


def fp8(t, fmt=E4M3):
    """Tensorwise current-scaled FP8 of t (scale = max / amax)."""
    return quantize_with_scale(t, fmt, fmt.max / t.abs().amax().float().clamp_min(1e-12), Granularity.tensor())


@pytest.mark.parametrize("sizes", SIZES)
def test_grouped_gemms_match_the_loop_on_the_same_fp8_operands(sizes):
    require_grouped_support()
    torch.manual_seed(0)
    k, n, experts = 512, 384, len(sizes)
    layer = SimpleNamespace(backend=ScaledMMBackend(), in_features=k, out_features=n)
    groups = align_groups(torch.tensor(sizes, device="cuda"), sizes, 16, min_rows=16)
    offsets = group_offsets(groups.padded_sizes, torch.device("cuda"))
    x_pad = scatter_to_padded(torch.randn(sum(sizes), k, device="cuda", dtype=torch.bfloat16), groups)
    dy_pad = scatter_to_padded(torch.randn(sum(sizes), n, device="cuda", dtype=torch.bfloat16), groups)
    x_rows, x_cols, dy_rows, dy_cols = fp8(x_pad), fp8(x_pad.t()), fp8(dy_pad), fp8(dy_pad.t())
    w_rows = [w_all.rows(e * n, n) for e in range(experts)]  # views: stacked without a copy
    w_cols = [w.t() for w in w_rows]  # separate tensors: stacked with one copy
    cases = [("output", x_rows, w_rows, n), ("grad_input", dy_rows, w_cols, k)]
    for gemm, a, b, width in cases:
        for fast in (True, False):
            layer.backend.fast_accum_output = fast
            loop = _expert_gemm_loop(layer, gemm, a, b, groups, torch.bfloat16, width, x_pad)
            fused = _expert_gemm_grouped(layer, gemm, a, b, groups, offsets, torch.bfloat16)
            assert fused.shape == loop.shape == (sum(sizes), width) and fused.dtype == loop.dtype
            assert rel_err(fused, loop) < 1e-3, f"{gemm} fast={fast}: rel err {rel_err(fused, loop):.2e}"
    loop = _token_gemm_loop(layer, dy_cols, x_cols, groups, torch.bfloat16)
    fused = _token_gemm_grouped(dy_cols, x_cols, groups, offsets, torch.bfloat16)
    assert fused.shape == loop.shape == (experts, n, k) and fused.dtype == loop.dtype
    assert rel_err(fused, loop) < 1e-3, f"grad_weight: rel err {rel_err(fused, loop):.2e}"
    for e in (e for e, size in enumerate(sizes) if size == 0):
        assert torch.equal(fused[e], torch.zeros_like(fused[e]))


def run(layer, x, dy, sizes):
    x = x.clone().requires_grad_()
    y = layer(x, torch.tensor(sizes, device="cuda"))
    y.backward(dy)
    grad_w, layer.weight.grad = layer.weight.grad, None
    return y.detach(), x.grad, grad_w


@pytest.mark.parametrize("recipe_name", ["current", "hybrid", "v3_fp8", "e4m3_current"])
@pytest.mark.parametrize("sizes", SIZES)
def test_grouped_layer_matches_the_loop_and_really_runs_grouped(monkeypatch, recipe_name, sizes):
    require_grouped_support()
    torch.manual_seed(0)
    recipe = E4M3_CURRENT if recipe_name == "e4m3_current" else load_recipe(recipe_name)
    grouped = GroupedLinear(len(sizes), 512, 384).cuda().to(torch.bfloat16)
    loop, fused = (FP8GroupedLinear.from_grouped(grouped, recipe, backend="scaled_mm") for _ in range(2))
    plan = plan_grouped_gemms(fused, torch.bfloat16, torch.bfloat16, torch.device("cuda"))
    print(f"{recipe_name}: {plan.describe()}")
    assert {g for g in GEMMS if plan.grouped[g]} == EXPECTED_GROUPED[recipe_name], plan.describe()
    calls, op = [], torch._scaled_grouped_mm

    def counting(*args, **kwargs):
        calls.append(args[1].dim())
        return op(*args, **kwargs)
    monkeypatch.setattr(torch, "_scaled_grouped_mm", counting)
    x = torch.randn(sum(sizes), 512, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn(sum(sizes), 384, device="cuda", dtype=torch.bfloat16)
    support = grouped_gemm.device_support
    for step in range(2):  # delayed recipes: step 1 runs with the scales step 0 recorded
        monkeypatch.setattr(grouped_gemm, "device_support", lambda device=None: (False, "the loop reference"))
        reference = run(loop, x, dy, sizes)
        monkeypatch.setattr(grouped_gemm, "device_support", support)
        assert not calls
        actual = run(fused, x, dy, sizes)
        assert len(calls) == len(EXPECTED_GROUPED[recipe_name]), f"{recipe_name}: {len(calls)} grouped calls"
        calls.clear()
        for gemm, a, b in zip(GEMMS, actual, reference):
            assert a.shape == b.shape and a.dtype == b.dtype, gemm
            assert torch.isfinite(a).all(), f"{recipe_name} {gemm} not finite"
            assert rel_err(a, b) < 1e-3, f"step {step} {recipe_name} {gemm}: rel err {rel_err(a, b):.2e}"
        for e in (e for e, size in enumerate(sizes) if size == 0):
            assert torch.equal(actual[2][e], torch.zeros_like(actual[2][e]))
        after_optimizer_step(loop)
        after_optimizer_step(fused)
