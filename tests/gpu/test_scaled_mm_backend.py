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
# + the card's formats with blockwise scales: cuBLAS rejects E5M2 there, the backend's BF16 fallback runs
DENSE_RECIPES = [*RECIPES, "v3_fp8_blockwise"]


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def twin_layers(recipe, k, n, dtype):
    base = torch.nn.Linear(k, n, bias=True, device="cuda", dtype=dtype)
    fast = FP8Linear.from_linear(base, recipe, backend="scaled_mm")
    ref = FP8Linear.from_linear(base, recipe, backend="emulated")
    return base, fast, ref


@pytest.mark.parametrize("recipe_name", DENSE_RECIPES)
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
    from fp8train.nn.grouped_linear import GroupedLinear
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


# The grouped function's aligned-groups layout: per-expert GEMMs on views of one padded FP8 buffer

COPY_OPS = {"aten::clone", "aten::copy_", "aten::_to_copy", "aten::contiguous"}


def copies_during(fn):
    """(fn(), the copy ops it dispatched, nested ones included, e.g. a clone in cuBLAS argument prep)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = fn()
    return out, sorted({e.name for e in prof.events()} & COPY_OPS)


def token_column_view(rows, dtype, t_pad, start, size):
    """Columns [start, start+size) of an FP8 cols operand [rows, T_pad]: leading dimension T_pad."""
    full = (torch.randn(rows, t_pad, device="cuda") * 8).to(dtype)
    view = full[:, start:start + size]
    assert view.stride() == (t_pad, 1) and not view.is_contiguous()
    return view


def test_scaled_mm_takes_strided_token_column_views_without_a_copy():
    """One expert's grad_weight, dY_e_cols . X_e_cols^T, on views of the padded [N|K, T_pad] cols."""
    from fp8train.numerics.gemm_backends import ScaledMMBackend
    from fp8train.quant import E4M3, E5M2, Granularity, QuantizedTensor

    torch.manual_seed(0)
    dy = token_column_view(384, torch.float8_e5m2, t_pad=208, start=48, size=96)
    x = token_column_view(256, torch.float8_e4m3fn, t_pad=208, start=48, size=96)
    dy_cols = QuantizedTensor(dy, torch.tensor(0.5, device="cuda"), Granularity.tensor(), E5M2)
    x_cols = QuantizedTensor(x, torch.tensor(0.25, device="cuda"), Granularity.tensor(), E4M3)
    out, copies = copies_during(lambda: ScaledMMBackend().mm(dy_cols, x_cols, torch.float32, "grad_weight"))
    assert copies == [], f"a strided operand was copied: {copies}"
    expected = (dy.double() * 0.5) @ (x.double() * 0.25).t()
    # Hopper's FP8 MMA accumulates at reduced precision inside each K chunk (about 1e-5 relative
    # here, measured); a wrongly strided operand would give rel err ~1
    assert rel_err(out.double(), expected) < 1e-3


def test_blockwise_scaled_mm_takes_strided_token_column_views_without_a_copy():
    """The blockwise grad_weight GEMM (1x128 x 1x128 tiles along tokens) on views at a 128-aligned start."""
    import torch.nn.functional as F

    if not hasattr(F, "scaled_mm") or torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("DeepSeek-style blockwise scaled_mm needs F.scaled_mm on Hopper")
    torch.manual_seed(0)
    dy = token_column_view(384, torch.float8_e4m3fn, t_pad=512, start=128, size=256)
    x = token_column_view(256, torch.float8_e4m3fn, t_pad=512, start=128, size=256)
    outer_major = lambda s: s.t().contiguous().t()  # noqa: E731  (R, tiles) with strides (1, R)
    scale_dy = outer_major(torch.rand(384, 2, device="cuda") + 0.5)
    scale_x = outer_major(torch.rand(256, 2, device="cuda") + 0.5)
    out, copies = copies_during(lambda: F.scaled_mm(dy, x.t(), scale_dy, F.ScalingType.BlockWise1x128, scale_x,
                                                    F.ScalingType.BlockWise1x128, output_dtype=torch.float32))
    assert copies == [], f"a strided operand was copied: {copies}"
    dy64 = dy.double() * scale_dy.double().repeat_interleave(128, dim=1)
    x64 = x.double() * scale_x.double().repeat_interleave(128, dim=1)
    assert rel_err(out.double(), dy64 @ x64.t()) < 1e-3  # see the tensorwise test above


@pytest.mark.parametrize("recipe_name", ["v3_fp8", "hybrid", "current", "blockwise"])
@pytest.mark.parametrize("sizes", [[0, 3, 17, 130, 362], [512, 0, 0, 0, 0], [1, 1, 1, 1, 508]])
def test_grouped_path_kernels_match_emulated(recipe_name, sizes):
    """Ragged groups (not multiples of 16, empty experts) through the grouped Triton kernels, over
    three steps so delayed scales move; the delayed scales must agree exactly. The kernel layers'
    token-major operands are padded to 128 per expert (their default: grad_weight through TMA);
    tensorwise recipes also run them ragged (tokens_align=None, pointer loads)."""
    from fp8train.nn.grouped_linear import GroupedLinear
    from fp8train.numerics import FP8GroupedLinear

    torch.manual_seed(0)
    recipe = load_recipe(recipe_name)
    grouped = GroupedLinear(len(sizes), 256, 384).cuda().to(torch.bfloat16)
    layers = [FP8GroupedLinear.from_grouped(grouped, recipe, backend=b) for b in ("scaled_mm", "emulated")]
    assert layers[0].grouped and layers[0].tokens_align == 128
    assert layers[1].tokens_align == (128 if recipe_name == "blockwise" else None)
    if recipe_name != "blockwise":
        layers.append(FP8GroupedLinear.from_grouped(grouped, recipe, backend="scaled_mm"))
        layers[2].tokens_align = None
    group_sizes = torch.tensor(sizes, device="cuda")
    x = torch.randn(sum(sizes), 256, device="cuda", dtype=torch.bfloat16)
    grad = torch.randn(sum(sizes), 384, device="cuda", dtype=torch.bfloat16)
    for step in range(3):
        results = []
        for layer in layers:
            xi = x.clone().requires_grad_(True)
            grouped.weight.grad = None
            y = layer(xi, group_sizes)
            y.backward(grad)
            results.append((y.detach(), xi.grad, grouped.weight.grad.clone()))
            after_optimizer_step(layer)
        emulated = results.pop(1)
        for kernel_result in results:
            for name, a, b in zip(("output", "grad_input", "grad_weight"), kernel_result, emulated):
                assert torch.isfinite(a).all(), f"{recipe_name} {name} not finite"
                assert rel_err(a, b) < 1e-2, f"step {step} {recipe_name} {name}: rel err {rel_err(a, b):.2e}"
        for kernel_layer in layers[:1] + layers[2:]:
            for cf, cr in zip(kernel_layer.modules(), layers[1].modules()):
                if hasattr(cf, "amax_history"):
                    torch.testing.assert_close(cf.scale, cr.scale, rtol=0, atol=0)


def test_dense_e5m2_blockwise_reason_names_the_bf16_products():
    """v3_fp8_blockwise on scaled_mm: the conversion report / trainer log say which GEMMs run in BF16."""
    layer = FP8Linear.from_linear(torch.nn.Linear(256, 256, device="cuda"), load_recipe("v3_fp8_blockwise"),
                                  backend="scaled_mm")
    assert "E5M2 operand (input)" in layer.backend_reason and "BF16 speed" in layer.backend_reason
    plain = FP8Linear.from_linear(torch.nn.Linear(256, 256, device="cuda"), load_recipe("blockwise"),
                                  backend="scaled_mm")
    assert "BF16" not in plain.backend_reason


@pytest.mark.parametrize("recipe_name", ["hybrid", "v3_fp8"])
def test_health_guard_blockwise_rung_runs_on_scaled_mm(recipe_name):
    """The FP8 health guard's tensorwise -> blockwise promotion keeps each role's format, so hybrid's
    E5M2 gradients and v3_fp8's E5M2 activations reach a blockwise GEMM that cuBLAS rejects; the
    promoted layer must train on scaled_mm (BF16 products for those GEMMs) like the emulated one."""
    from fp8train.numerics.gemm_backends import EmulatedBackend
    from fp8train.numerics.health_guard import Promotion, promote_layer

    torch.manual_seed(0)
    base = torch.nn.Linear(512, 384, bias=False, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(256, 512, device="cuda", dtype=torch.bfloat16)
    grad = torch.randn(256, 384, device="cuda", dtype=torch.bfloat16)
    outs = []
    for backend in ("scaled_mm", "emulated"):
        model = torch.nn.Sequential(FP8Linear.from_linear(base, load_recipe(recipe_name), backend=backend))
        layer = promote_layer(model, "0", Promotion.BLOCKWISE)  # recipe backend "auto": scaled_mm here
        if backend == "emulated":
            layer.backend, layer.backend_reason = EmulatedBackend(), "emulated (the reference)"
        assert layer.recipe.name.endswith("+blockwise")
        xi = x.clone().requires_grad_(True)
        base.weight.grad = None
        y = model(xi)
        y.backward(grad)
        outs.append((y.detach(), xi.grad, base.weight.grad.clone()))
    for name, a, b in zip(("output", "grad_input", "grad_weight"), *outs):
        assert torch.isfinite(a).all(), name
        assert rel_err(a, b) < 1e-2, f"{recipe_name}+blockwise {name}: rel err {rel_err(a, b):.2e}"
