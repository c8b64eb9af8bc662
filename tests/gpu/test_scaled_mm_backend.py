"""On an FP8 GPU: the scaled_mm backend computes what the emulated backend computes.

Both backends see identical FP8 operands (same casts), so they may differ only by FP32
accumulation order, fast accumulation in the forward GEMM and the output rounding.
"""

import pytest
import torch

from fp8train.numerics import FP8Linear, after_optimizer_step, fp8_gemm_capability, load_recipe

ok, why = fp8_gemm_capability()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not ok, reason=why)]

RECIPES = ["v3_fp8", "hybrid", "current", "rowwise", "blockwise"]


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def twin_layers(recipe, k, n, dtype):
    base = torch.nn.Linear(k, n, bias=True, device="cuda", dtype=dtype)
    fast = FP8Linear.from_linear(base, recipe, backend="scaled_mm")
    ref = FP8Linear.from_linear(base, recipe, backend="emulated")
    return base, fast, ref


@pytest.mark.parametrize("recipe_name", RECIPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(512, 1024, 768), (1000, 512, 384), (256, 384, 640)])
def test_scaled_mm_matches_emulated(recipe_name, dtype, shape):
    recipe = load_recipe(recipe_name)
    tokens, k, n = shape
    torch.manual_seed(0)
    base, fast, ref = twin_layers(recipe, k, n, dtype)
    x = torch.randn(tokens, k, device="cuda", dtype=dtype)
    grad = torch.randn(tokens, n, device="cuda", dtype=dtype)
    for step in range(3):  # delayed recipes: compare after scales moved off their initial value
        outs = []
        for layer in (fast, ref):
            xi = x.clone().requires_grad_(True)
            base.weight.grad = None
            base.bias.grad = None
            y = layer(xi)
            y.backward(grad)
            outs.append((y.detach(), xi.grad, base.weight.grad.clone(), base.bias.grad.clone()))
            after_optimizer_step(layer)
        for name, a, b in zip(("output", "grad_input", "grad_weight", "grad_bias"), outs[0], outs[1]):
            assert torch.isfinite(a).all(), f"{recipe_name} {name} not finite"
            tol = 1e-2 if dtype == torch.bfloat16 else 3e-3
            assert rel_err(a, b) < tol, f"step {step} {recipe_name} {name}: rel err {rel_err(a, b):.2e}"
        for cf, cr in zip(fast.modules(), ref.modules()):
            if hasattr(cf, "amax_history"):
                torch.testing.assert_close(cf.scale, cr.scale, rtol=0, atol=0)


@pytest.mark.parametrize("recipe_name", RECIPES)
def test_grouped_scaled_mm_matches_emulated(recipe_name):
    from fp8train.models.grouped_linear import GroupedLinear
    from fp8train.numerics import FP8GroupedLinear

    torch.manual_seed(0)
    recipe = load_recipe(recipe_name)
    grouped = GroupedLinear(4, 256, 384).cuda().to(torch.bfloat16)
    sizes = torch.tensor([100, 0, 300, 112], device="cuda")
    x = torch.randn(512, 256, device="cuda", dtype=torch.bfloat16)
    grad = torch.randn(512, 384, device="cuda", dtype=torch.bfloat16)
    results = []
    for backend in ("scaled_mm", "emulated"):
        layer = FP8GroupedLinear.from_grouped(grouped, recipe, backend=backend)
        xi = x.clone().requires_grad_(True)
        grouped.weight.grad = None
        y = layer(xi, sizes)
        y.backward(grad)
        results.append((y.detach(), xi.grad, grouped.weight.grad.clone()))
    for name, a, b in zip(("output", "grad_input", "grad_weight"), *results):
        assert rel_err(a, b) < 1e-2, f"{recipe_name} grouped {name}: rel err {rel_err(a, b):.2e}"
