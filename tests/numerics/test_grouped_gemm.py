"""The grouped-GEMM path of the FP8 grouped function, on CPU.

torch._scaled_grouped_mm has no CPU kernel, so on CPU the support check must say no and the
per-expert loop must run. The wiring (layouts, offsets, scale expansion, real-row gather, empty
experts) is still checked here: with support forced on, a pure-torch stand-in for the op first
passes its arguments through torch's own meta checks (shapes, strides, dtypes, scale lengths),
then computes what the CUDA kernel computes, and the layer must match the per-expert loop.
"""

import pytest
import torch

from fp8train.nn.grouped_linear import GroupedLinear
from fp8train.numerics import FP8GroupedLinear, after_optimizer_step, load_recipe, recipe_from_dict
from fp8train.quant import E4M3, E5M2
from fp8train.numerics import grouped_gemm
from fp8train.numerics.gemm_backends import ScaledMMBackend
from fp8train.numerics.grouped_gemm import GEMMS, grouped_gemm_support, plan_grouped_gemms
from tests.numerics.helpers import grouped_fwd_bwd

IN, OUT = 64, 96  # multiples of 16, as torch's grouped kernel needs
SIZES = [[0, 3, 17, 130, 362], [512, 0, 0, 0, 0], [16, 16, 16, 16, 16]]
E4M3_CURRENT = recipe_from_dict({"name": "e4m3_current", "input": {"format": "e4m3", "scaling": "current"},
                                 "weight": {"format": "e4m3", "scaling": "current"},
                                 "grad_output": {"format": "e4m3", "scaling": "current"}})
EXPECTED_GROUPED = {"hybrid": {"output"}, "current": {"output"}, "v3_fp8": {"grad_input"},
                    "e4m3_current": set(GEMMS)}
ORIGINAL_OP = torch._scaled_grouped_mm


def recipe_by_name(name):
    return E4M3_CURRENT if name == "e4m3_current" else load_recipe(name)


def scaled_mm_layer(grouped: GroupedLinear, recipe) -> FP8GroupedLinear:
    """The scaled_mm backend on CPU (torch._scaled_mm has a CPU kernel; select_backend refuses CPU)."""
    layer = FP8GroupedLinear.from_grouped(grouped, recipe, backend="emulated")
    layer.backend = ScaledMMBackend()
    return layer



def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def on_meta(t):
    return None if t is None else torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")


def reference_scaled_grouped_mm(mat_a, mat_b, scale_a, scale_b, offs=None, bias=None, scale_result=None,
                                out_dtype=None, use_fast_accum=False):
    """What the CUDA kernel computes, after torch's meta function has checked the arguments."""
    ORIGINAL_OP(on_meta(mat_a), on_meta(mat_b), on_meta(scale_a), on_meta(scale_b), offs=on_meta(offs),
                out_dtype=out_dtype, use_fast_accum=use_fast_accum)
    ends = offs.tolist()
    bounds = list(zip([0, *ends[:-1]], ends))
    assert all((end - start) % 16 == 0 for start, end in bounds), "TMA: groups must be 16-row aligned"
    a, b = mat_a.float(), mat_b.float()
    if mat_b.dim() == 3:  # groups of rows of mat_a, one [K, N] matrix each
        out = torch.zeros(a.shape[0], b.shape[2])
        for g, (start, end) in enumerate(bounds):
            out[start:end] = (a[start:end] * scale_a[start:end, None]) @ (b[g] * scale_b[g][None, :])
    else:  # groups along the contraction: one [M, N] output per group
        (m, _), n = a.shape, b.shape[1]
        out = torch.zeros(len(bounds), m, n)
        for g, (start, end) in enumerate(bounds):
            assert end > start, "the CUDA kernel asserts on a group without tokens in the 2d x 2d form"
            out[g] = (a[:, start:end] * scale_a[g * m:(g + 1) * m, None]) @ \
                (b[start:end] * scale_b[g * n:(g + 1) * n][None, :])
    return out.to(out_dtype or torch.bfloat16)


def force_support(monkeypatch, ok: bool):
    monkeypatch.setattr(grouped_gemm, "device_support", lambda device=None: (ok, "forced by the test"))


def test_support_says_no_on_cpu_with_a_reason():
    ok, why = grouped_gemm_support(E4M3, E4M3, device=torch.device("cpu"))
    assert not ok and "cpu" in why and "CUDA" in why
    if not torch.cuda.is_available():
        ok, why = grouped_gemm_support(E4M3, E4M3)
        assert not ok and "no CUDA device" in why


def test_support_names_the_formats_and_dtype_it_rejects(monkeypatch):
    force_support(monkeypatch, True)
    assert grouped_gemm_support(E4M3, E4M3) == (True, "forced by the test")
    ok, why = grouped_gemm_support(E5M2, E4M3)
    assert not ok and "E5M2 x E4M3" in why and "E4M3 x E4M3 only" in why
    ok, why = grouped_gemm_support("e4m3", "e5m2")
    assert not ok and "E4M3 x E5M2" in why
    ok, why = grouped_gemm_support(E4M3, E4M3, torch.float32)
    assert not ok and "BF16 only" in why and "float32" in why


@pytest.mark.parametrize("recipe_name", ["hybrid", "current", "v3_fp8", "e4m3_current"])
def test_plan_per_recipe(monkeypatch, recipe_name):
    force_support(monkeypatch, True)
    grouped = GroupedLinear(4, IN, OUT).to(torch.bfloat16)
    layer = scaled_mm_layer(grouped, recipe_by_name(recipe_name))
    plan = plan_grouped_gemms(layer, torch.bfloat16, torch.bfloat16)
    assert {g for g in GEMMS if plan.grouped[g]} == EXPECTED_GROUPED[recipe_name], plan.describe()
    for gemm in GEMMS:
        if not plan.grouped[gemm]:
            assert "E4M3 x E4M3 only" in plan.reasons[gemm]
    print(recipe_name, plan.describe())
    # an FP32 model: no BF16 outputs; the emulated backend: no grouped GEMM at all
    assert not plan_grouped_gemms(layer, torch.float32, torch.float32).any
    emulated = FP8GroupedLinear.from_grouped(grouped, recipe_by_name(recipe_name), backend="emulated")
    plan = plan_grouped_gemms(emulated, torch.bfloat16, torch.bfloat16)
    assert not plan.any and plan.describe().startswith("per-expert loop for all GEMMs: backend emulated")


def test_rowwise_and_blockwise_layers_keep_their_loops(monkeypatch):
    force_support(monkeypatch, True)
    for name in ("rowwise", "blockwise"):
        layer = scaled_mm_layer(GroupedLinear(2, 128, 128).to(torch.bfloat16), load_recipe(name))
        assert not plan_grouped_gemms(layer, torch.bfloat16, torch.bfloat16).any, name


@pytest.mark.parametrize("recipe_name", ["hybrid", "current", "v3_fp8", "e4m3_current"])
def test_grouped_path_is_never_taken_on_cpu(monkeypatch, recipe_name):
    def fail(*args, **kwargs):
        raise AssertionError("torch._scaled_grouped_mm called on CPU")
    monkeypatch.setattr(torch, "_scaled_grouped_mm", fail)
    sizes = SIZES[0]
    grouped = GroupedLinear(len(sizes), IN, OUT).to(torch.bfloat16)
    x, dy = torch.randn(sum(sizes), IN, dtype=torch.bfloat16), torch.randn(sum(sizes), OUT, dtype=torch.bfloat16)
    for layer in (scaled_mm_layer(grouped, recipe_by_name(recipe_name)),
                  FP8GroupedLinear.from_grouped(grouped, recipe_by_name(recipe_name), backend="emulated")):
        assert not plan_grouped_gemms(layer, torch.bfloat16, torch.bfloat16).any
        y, grad_x, grad_w = grouped_fwd_bwd(layer, x, dy, sizes)
        assert torch.isfinite(y).all() and torch.isfinite(grad_x).all() and torch.isfinite(grad_w).all()


@pytest.mark.parametrize("recipe_name", ["hybrid", "current", "v3_fp8", "e4m3_current"])
@pytest.mark.parametrize("sizes", SIZES)
def test_grouped_wiring_matches_the_loop_with_a_reference_op(monkeypatch, recipe_name, sizes):
    calls = []
    def counting(*args, **kwargs):
        calls.append(args[1].dim())
        return reference_scaled_grouped_mm(*args, **kwargs)
    monkeypatch.setattr(torch, "_scaled_grouped_mm", counting)
    grouped = GroupedLinear(len(sizes), IN, OUT).to(torch.bfloat16)
    loop, fused = (scaled_mm_layer(grouped, recipe_by_name(recipe_name)) for _ in range(2))
    x, dy = torch.randn(sum(sizes), IN, dtype=torch.bfloat16), torch.randn(sum(sizes), OUT, dtype=torch.bfloat16)
    expected_calls = len(EXPECTED_GROUPED[recipe_name])
    for step in range(2):  # delayed recipes: step 1 runs with the scales step 0 recorded
        force_support(monkeypatch, False)
        reference = grouped_fwd_bwd(loop, x, dy, sizes)
        assert not calls
        force_support(monkeypatch, True)
        actual = grouped_fwd_bwd(fused, x, dy, sizes)
        assert len(calls) == expected_calls, f"{len(calls)} grouped calls, expected {expected_calls}"
        calls.clear()
        for gemm, a, b in zip(GEMMS, actual, reference):
            assert a.shape == b.shape and a.dtype == b.dtype, gemm
            assert rel_err(a, b) < 1e-3, f"step {step} {gemm}: rel err {rel_err(a, b):.2e}"
        for e in (e for e, size in enumerate(sizes) if size == 0):
            assert torch.equal(actual[2][e], torch.zeros(OUT, IN, dtype=torch.bfloat16))
        after_optimizer_step(loop)
        after_optimizer_step(fused)
