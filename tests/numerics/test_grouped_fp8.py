"""The FP8 grouped function's grouped path (tensorwise and blockwise recipes) on the emulated
backend: exact against the dense FP8 layer per expert, the same results and FP8 state as the
per-expert path, current scaling against a float64 reference, and a fixed number of casts per step
whatever the number of experts."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fp8train.nn.grouped_linear import GroupedLinear
from fp8train.numerics import FP8GroupedLinear, FP8Linear, after_optimizer_step, load_recipe
from fp8train.numerics.role_caster import RoleCaster
from fp8train.numerics.grouped_gemm import EMULATION_PAD
from fp8train.numerics.grouped_linear import runs_grouped
from tests.numerics.helpers import f32, make_recipe, ref_current_scale
from tests.numerics.helpers import grouped_fwd_bwd

IN, OUT = 128, 256  # multiples of 128, so every recipe (blockwise too) takes these shapes
ROLES = ("input", "weight", "grad_output")
GEMMS = ("output", "grad_input", "grad_weight")
RAGGED = [[0, 3, 17, 130], [16, 0, 5, 0], [128, 1]]


def grouped_layer(recipe, num_experts: int, dtype=torch.float32) -> FP8GroupedLinear:
    return FP8GroupedLinear.from_grouped(GroupedLinear(num_experts, IN, OUT).to(dtype), recipe, backend="emulated")


def ragged_inputs(sizes: list[int], dtype):
    """x [T, IN] and dy [T, OUT] whose experts differ in magnitude (1.7**e, not a power of two, so
    a per-expert scale would give different FP8 mantissas than one scale for the whole tensor)."""
    expert = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    spread = (1.7 ** expert.double()).float()[:, None]
    return (torch.randn(len(expert), IN) * spread).to(dtype), (torch.randn(len(expert), OUT) / spread).to(dtype)



def caster_state(layer) -> dict[str, dict[str, torch.Tensor]]:
    return {role: {k: v.clone() for k, v in getattr(layer, f"{role}_caster").state_dict().items()} for role in ROLES}


def emulation_pad(recipe) -> int:
    return 128 if recipe.name == "blockwise" else EMULATION_PAD


def dense_fp8_per_expert(recipe, weight, state, x, dy, sizes, align):
    """Reference: per expert, the dense FP8Linear on its rows zero-padded to `align` rows.

    Padding gives the GEMMs the shapes the emulated grouped GEMMs multiply (grouped_gemm.py): CPU
    BLAS sums in a shape-dependent order, so unpadded GEMMs could differ in the last FP32 bit while
    multiplying identical FP8 operands (the per-expert path is compared below to FP32 rounding). All experts share one set of casters
    starting from `state`; every expert's weight is cast, used or not, as the grouped layer casts
    all experts' weights at once.
    """
    casters = {role: RoleCaster(role, recipe.role(role)) for role in ROLES}
    for role, caster in casters.items():
        caster.load_state_dict(state[role])
    ys, grad_xs, grad_ws = [], [], []
    for e, (x_e, dy_e) in enumerate(zip(x.split(sizes), dy.split(sizes))):
        linear = nn.Linear(IN, OUT, bias=False, dtype=weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(weight[e])
        dense = FP8Linear.from_linear(linear, recipe, backend="emulated")
        dense.input_caster, dense.weight_caster, dense.grad_output_caster = (casters[r] for r in ROLES)
        if sizes[e] == 0:
            dense.fp8_weight()
            grad_ws.append(torch.zeros_like(linear.weight))
            continue
        extra = -sizes[e] % align
        x_pad = F.pad(x_e, (0, 0, 0, extra)).requires_grad_()
        y = dense(x_pad)
        y.backward(F.pad(dy_e, (0, 0, 0, extra)))
        ys.append(y.detach()[:sizes[e]])
        grad_xs.append(x_pad.grad[:sizes[e]])
        grad_ws.append(linear.weight.grad)
    return (torch.cat(ys), torch.cat(grad_xs), torch.stack(grad_ws)), casters


@pytest.mark.parametrize("recipe_name", ["v3_fp8", "hybrid", "blockwise"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("sizes", RAGGED)
def test_grouped_path_is_bit_identical_to_dense_fp8_per_expert(recipe_name, dtype, sizes):
    recipe = load_recipe(recipe_name)
    layer = grouped_layer(recipe, len(sizes), dtype)
    assert layer.grouped and layer.tokens_align == (128 if recipe_name == "blockwise" else None)
    x, dy = ragged_inputs(sizes, dtype)
    for step in range(2):  # delayed recipes: step 1 runs with the scales step 0 recorded
        state = caster_state(layer)
        actual = grouped_fwd_bwd(layer, x, dy, sizes)
        expected, ref_casters = dense_fp8_per_expert(recipe, layer.weight.detach(), state, x, dy, sizes,
                                                     emulation_pad(recipe))
        for gemm, a, b in zip(GEMMS, actual, expected):
            assert a.dtype == b.dtype and torch.equal(a, b), f"step {step} {gemm}"
        for role in ROLES:  # the recorded amax histories (delayed) agree bit for bit
            for key, buf in ref_casters[role].state_dict().items():
                assert torch.equal(caster_state(layer)[role][key], buf), f"step {step} {role}.{key}"
        after_optimizer_step(layer)


@pytest.mark.parametrize("recipe_name", ["v3_fp8", "blockwise"])
@pytest.mark.parametrize("sizes", RAGGED)
def test_grouped_path_matches_the_per_expert_path(recipe_name, sizes):
    """Delayed and blockwise: the per-expert path quantizes each expert's token-major operands on its
    own, with the same scale (delayed) or the same 128x1 tiles (blockwise, 128-aligned groups), so
    both paths multiply the same FP8 values: only the FP32 summation order differs. The amax
    histories agree bit for bit."""
    grouped = grouped_layer(load_recipe(recipe_name), len(sizes))
    per_expert = copy.deepcopy(grouped)
    per_expert.grouped = False
    x, dy = ragged_inputs(sizes, torch.float32)
    for step in range(2):
        results = [grouped_fwd_bwd(layer, x, dy, sizes) for layer in (grouped, per_expert)]
        for gemm, new, old in zip(GEMMS, *results):
            torch.testing.assert_close(new, old, rtol=1e-5, atol=1e-5, msg=f"step {step} {gemm}")
        new_state, old_state = caster_state(grouped), caster_state(per_expert)
        assert all(torch.equal(new_state[r][k], v) for r in ROLES for k, v in old_state[r].items())
        after_optimizer_step(grouped)
        after_optimizer_step(per_expert)


def whole_tensor_current(t: torch.Tensor, fmt) -> torch.Tensor:
    """float64 reference of current scaling with ONE scale for the whole tensor: the dequantized
    FP8 values q * scale_inv, exact in float64 (4 significant bits times 24)."""
    scale = ref_current_scale(t.double().abs().max().item(), fmt.max)
    q = (t.float() * torch.tensor(scale)).clamp(-fmt.max, fmt.max).to(fmt.dtype)
    return q.double() * f32(1.0 / scale)


def current_reference(layer, x, dy, sizes):
    """Per non-empty expert: float64 GEMMs of the whole-tensor-scaled operands, |A| |B|^T for the
    error bound, and the contraction length the aligned path uses (padded to 16)."""
    fmts = {role: getattr(layer, f"{role}_caster").fmt for role in ROLES}
    xq, dyq = whole_tensor_current(x, fmts["input"]), whole_tensor_current(dy, fmts["grad_output"])
    wq = whole_tensor_current(layer.weight.detach().reshape(-1, IN), fmts["weight"]).reshape(len(sizes), OUT, IN)
    out = {gemm: [] for gemm in GEMMS}
    for e, (x_e, dy_e) in enumerate(zip(xq.split(sizes), dyq.split(sizes))):
        if sizes[e] == 0:
            continue
        for gemm, a, b in (("output", x_e, wq[e]), ("grad_input", dy_e, wq[e].t()),
                           ("grad_weight", dy_e.t(), x_e.t())):
            out[gemm].append((a @ b.t(), a.abs() @ b.abs().t(), -(-a.shape[1] // 16) * 16))
    return out


def within_fp32_bound(actual: torch.Tensor, parts) -> bool:
    """|actual - exact| <= FP32 error of the emulated GEMM plus the output rounding.

    The emulated GEMM dequantizes in FP32 (relative error 2^-24 per factor) and sums k products
    in FP32 (at most (k-1) 2^-24 sum|terms|), then rounds once to the output dtype: not exact,
    but FP8 quantization differences are ~2^-4 relative, orders of magnitude above this bound.
    """
    exact, abs_sum, k = parts
    gemm_err = (k + 2) * 2.0 ** -24 * abs_sum
    out_ulp = 2.0 ** -8 if actual.dtype == torch.bfloat16 else 2.0 ** -24
    bound = gemm_err + out_ulp * (exact.abs() + gemm_err)
    return bool(((actual.double() - exact).abs() <= bound).all())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("sizes", RAGGED)
def test_current_scaling_uses_one_scale_per_tensor_like_the_dense_layer(dtype, sizes):
    layer = grouped_layer(load_recipe("current"), len(sizes), dtype)
    x, dy = ragged_inputs(sizes, dtype)
    reference = current_reference(layer, x, dy, sizes)
    y, grad_x, grad_w = grouped_fwd_bwd(layer, x, dy, sizes)
    actual = {"output": y.split(sizes), "grad_input": grad_x.split(sizes), "grad_weight": grad_w}
    for gemm in GEMMS:
        rows = [out for out, size in zip(actual[gemm], sizes) if size]
        assert all(within_fp32_bound(a, parts) for a, parts in zip(rows, reference[gemm])), gemm
    for e in (e for e, size in enumerate(sizes) if size == 0):
        assert torch.equal(grad_w[e], torch.zeros(OUT, IN, dtype=dtype))  # an expert without tokens


def test_per_expert_current_cols_scales_differ_from_the_whole_tensor_reference():
    """The check above can tell: the per-expert path scales each expert's cols by its own amax."""
    sizes = RAGGED[0]
    layer = grouped_layer(load_recipe("current"), len(sizes))
    layer.grouped = False
    x, dy = ragged_inputs(sizes, torch.float32)
    reference = current_reference(layer, x, dy, sizes)
    grad_w = grouped_fwd_bwd(layer, x, dy, sizes)[2]
    used = [w for w, s in zip(grad_w, sizes) if s]
    assert not all(within_fp32_bound(a, parts) for a, parts in zip(used, reference["grad_weight"]))


def count_casts(layer) -> list[int]:
    """Wrap every caster's cast and cast_cols with a call counter; returns the counter."""
    calls = [0]
    for role in ROLES:
        caster = getattr(layer, f"{role}_caster")
        for name in ("cast", "cast_cols"):
            def counted(*args, _inner=getattr(caster, name), **kwargs):
                calls[0] += 1
                return _inner(*args, **kwargs)
            setattr(caster, name, counted)
    return calls


def casts_per_step(recipe_name: str, num_experts: int, grouped: bool = True) -> int:
    layer = grouped_layer(load_recipe(recipe_name), num_experts)
    if not grouped:
        layer.grouped = False
    calls = count_casts(layer)
    sizes = [5] * num_experts
    grouped_fwd_bwd(layer, *ragged_inputs(sizes, torch.float32), sizes)
    return calls[0]


@pytest.mark.parametrize("recipe_name", ["v3_fp8", "hybrid", "current", "blockwise"])
def test_quantization_casts_per_step_do_not_grow_with_the_number_of_experts(recipe_name):
    """X, W and dY are each cast once per forward+backward (tensorwise: rows and transposed copy in
    one cast); blockwise casts X and dY twice, rows (1x128) and token-major cols (128x1)."""
    expected = 5 if recipe_name == "blockwise" else 3
    assert casts_per_step(recipe_name, 2) == casts_per_step(recipe_name, 8) == expected
    assert casts_per_step(recipe_name, 8, grouped=False) > casts_per_step(recipe_name, 2, grouped=False)


@pytest.mark.parametrize("recipe_name, align", [("v3_fp8", None), ("v3_fp8", 128), ("blockwise", 128)])
def test_backward_keeps_fp8_cols_and_device_offsets_only(recipe_name, align):
    """Saved: X_cols (ragged: tokens padded to 16 at the end; padded: the layout of static length
    T + E * 127 rounded to 128) and the group offsets, all on the device."""
    sizes = [0, 3, 17, 130]
    layer = grouped_layer(load_recipe(recipe_name), len(sizes), torch.bfloat16)
    layer.tokens_align = align
    x, _ = ragged_inputs(sizes, torch.bfloat16)
    y = layer(x.requires_grad_(), torch.tensor(sizes))
    tokens = sum(sizes)
    data, scale_inv, offs, padded_offs, dest_rows, row_of, weight = y.grad_fn.saved_tensors
    assert weight is None, "eager mode keeps the cached FP8 weight, not W (W is saved only when compiled)"
    assert data.dtype == layer.input_caster.fmt.dtype and scale_inv.dtype == torch.float32
    assert offs.dtype == torch.int32 and offs.tolist() == [0, 3, 20, 150]
    if align:
        assert data.shape == (IN, row_of.shape[0]) and row_of.shape[0] == -(-(tokens + 4 * 127) // 128) * 128
        assert padded_offs.tolist() == [0, 128, 256, 512] and dest_rows.shape == (tokens,)
    else:
        assert data.shape == (IN, -(-tokens // 16) * 16) and padded_offs is None and dest_rows is None and row_of is None


@pytest.mark.parametrize("recipe_name", ["hybrid", "blockwise"])
def test_frozen_weight_or_input_without_grad(recipe_name):
    sizes = [0, 3, 17, 130]
    layer = grouped_layer(load_recipe(recipe_name), len(sizes))
    x, dy = ragged_inputs(sizes, torch.float32)
    _, grad_x, grad_w = grouped_fwd_bwd(layer, x, dy, sizes)
    layer.weight.requires_grad_(False)
    xi = x.clone().requires_grad_()
    y = layer(xi, torch.tensor(sizes))
    assert y.grad_fn.saved_tensors[0] is None  # no cols cast without a weight gradient
    y.backward(dy)
    assert torch.equal(xi.grad, grad_x)
    layer.weight.requires_grad_(True)
    layer(x, torch.tensor(sizes)).backward(dy)
    assert torch.equal(layer.weight.grad, grad_w)


def test_rowwise_and_percentile_recipes_keep_the_per_expert_path():
    assert not runs_grouped(load_recipe("rowwise"))
    clipped = make_recipe(input={"format": "e4m3", "scaling": "current", "amax_percentile": 99.0},
                          weight={"format": "e4m3", "scaling": "current"},
                          grad_output={"format": "e5m2", "scaling": "current"})
    assert not runs_grouped(clipped)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rowwise_grouped_is_bit_identical_to_dense_fp8_per_expert(dtype):
    """Per-expert path, unpadded: rowwise cols scales run over one expert's tokens, as in the dense
    layer given that expert's rows alone."""
    sizes = RAGGED[0]
    recipe = load_recipe("rowwise")
    layer = grouped_layer(recipe, len(sizes), dtype)
    x, dy = ragged_inputs(sizes, dtype)
    expected, _ = dense_fp8_per_expert(recipe, layer.weight.detach(), caster_state(layer), x, dy, sizes, 1)
    for gemm, a, b in zip(GEMMS, grouped_fwd_bwd(layer, x, dy, sizes), expected):
        assert torch.equal(a, b), gemm


def test_group_sizes_must_cover_the_input():
    layer = grouped_layer(load_recipe("hybrid"), 2)
    with pytest.raises(ValueError, match="sum to 5 but the input has 6 rows"):
        layer(torch.randn(6, IN), torch.tensor([2, 3]))


@pytest.mark.parametrize("recipe_name", ["hybrid", "blockwise"])
def test_moe_block_evaluates_under_no_grad_without_token_major_casts(recipe_name):
    """Evaluation (no_grad): the tokens are cast once before dispatch, without a transposed copy or
    token-major tiles (ctx.needs_input_grad ignores grad mode: the layer decides it)."""
    from fp8train.models.moe import MoE, MoEConfig
    from fp8train.numerics import convert_to_fp8

    block = MoE(IN, MoEConfig(n_routed_experts=4, n_shared_experts=0, top_k=2, expert_ffn_hidden=OUT))
    convert_to_fp8(block, load_recipe(recipe_name), backend="emulated")
    x = torch.randn(2, 16, IN)
    block(x)[0].sum().backward()  # a training step first: the weights are cached
    block.eval()
    caster, calls = block.experts.gate_proj.input_caster, []
    cast, cast_cols = caster.cast, caster.cast_cols
    caster.cast = lambda t, need_cols: calls.append(("cast", need_cols)) or cast(t, need_cols)
    caster.cast_cols = lambda t: calls.append(("cols", None)) or cast_cols(t)
    with torch.no_grad():
        out, _ = block(x)
    assert calls == [("cast", False)] and out.grad_fn is None and torch.isfinite(out).all()
