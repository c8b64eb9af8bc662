"""Tensorwise grad_weight operands in the padded token layout (every expert on 128-aligned tokens).

Padding changes WHERE the token-major FP8 codes sit, not which codes: the rows are cast as before
and their codes permuted (one scale per tensor), zero tokens fill the gaps, and output / grad_input
read the same ragged rows. So output, grad_input and the FP8 state are bit-identical to the ragged
layout. grad_weight sums the same FP32 products plus zeros: the kernels walk the same 128-token
chunks relative to each group's start (bit-identical), the emulation hands CPU BLAS a longer
contraction (zeros up to 128 instead of 16), which may block the sum differently: FP32 summation
order, checked to 1e-6 relative. The kernel path gets 128-aligned offsets with `groups_aligned`, and
the layout is built on the device without a host read (a compiled block has no graph break).
"""

import copy

import pytest
import torch

import kernels
import kernels.library  # noqa: F401 (registers torch.ops.fp8train.*)
from fp8train.models.moe import MoE, MoEConfig, RoutedExperts
from fp8train.nn.grouped_linear import GroupedLinear
from fp8train.numerics import FP8GroupedLinear, after_optimizer_step, convert_to_fp8, load_recipe
from fp8train.numerics.gemm_backends import ScaledMMBackend
from fp8train.numerics.grouped_linear import default_tokens_align
from tests.numerics.helpers import grouped_fwd_bwd

IN, OUT = 128, 256
SIZES = [0, 3, 17, 130]
GEMMS = ("output", "grad_input", "grad_weight")


def layer_pair(recipe_name: str, kernel_backend: bool = False):
    """(ragged, padded) copies of one tensorwise grouped layer."""
    torch.manual_seed(0)
    ragged = FP8GroupedLinear.from_grouped(GroupedLinear(len(SIZES), IN, OUT), load_recipe(recipe_name),
                                           backend="emulated")
    if kernel_backend:
        ragged.backend = ScaledMMBackend()  # kernels.grouped_mm_* (the Triton interpreter on CPU)
    ragged.tokens_align = None
    padded = copy.deepcopy(ragged)
    padded.tokens_align = 128
    return ragged, padded


def assert_identical(new, old, what: str, grad_weight_exact: bool = True) -> None:
    """output and grad_input bit for bit; grad_weight too, or to FP32 summation order."""
    for gemm, a, b in zip(GEMMS, new, old):
        assert a.dtype == b.dtype, f"{what} {gemm}"
        if gemm == "grad_weight" and not grad_weight_exact:
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=f"{what} {gemm}")
        else:
            assert torch.equal(a, b), f"{what} {gemm}: max diff {(a - b).abs().max():.3e}"


def assert_same_fp8_state(a: torch.nn.Module, b: torch.nn.Module, what: str) -> None:
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        if "caster" in name:
            assert torch.equal(x, y), f"{what}: {name}"


@pytest.mark.parametrize("recipe_name", ["hybrid", "current", "v3_fp8"])
def test_padded_token_layout_matches_ragged(recipe_name):
    ragged, padded = layer_pair(recipe_name)
    gen = torch.Generator().manual_seed(1)
    for step in range(2):  # delayed: step 1 runs with the scales step 0 recorded
        x = torch.randn(sum(SIZES), IN, generator=gen) * (step + 1)
        dy = torch.randn(sum(SIZES), OUT, generator=gen)
        assert_identical(grouped_fwd_bwd(padded, x, dy, SIZES), grouped_fwd_bwd(ragged, x, dy, SIZES), f"step {step}",
                         grad_weight_exact=False)
        assert_same_fp8_state(padded, ragged, f"step {step}")
        after_optimizer_step(ragged)
        after_optimizer_step(padded)


def test_kernel_path_reads_128_aligned_token_groups(monkeypatch):
    """The tokens-form kernel gets padded offsets (multiples of 128) and the aligned promise; its
    result equals the ragged kernel's bit for bit (same chunks per group, zeros in the tail)."""
    seen = []
    original = kernels.grouped_mm_tokens_tensorwise

    def recording(a, b, a_scale_inv, b_scale_inv, offs, *args, **kwargs):
        seen.append((offs.clone(), a.shape[1], b.shape[1], args[2] if len(args) > 2 else False))
        return original(a, b, a_scale_inv, b_scale_inv, offs, *args, **kwargs)

    monkeypatch.setattr(kernels, "grouped_mm_tokens_tensorwise", recording)
    ragged, padded = layer_pair("hybrid", kernel_backend=True)
    x, dy = torch.randn(sum(SIZES), IN), torch.randn(sum(SIZES), OUT)
    expected = grouped_fwd_bwd(ragged, x, dy, SIZES)
    (ragged_offs, *_, ragged_aligned), = seen
    assert ragged_offs.tolist() == [0, 3, 20, 150] and not ragged_aligned
    seen.clear()
    assert_identical(grouped_fwd_bwd(padded, x, dy, SIZES), expected, "kernels")
    (offs, a_tokens, b_tokens, aligned), = seen
    assert offs.tolist() == [0, 128, 256, 512] and aligned
    assert a_tokens == b_tokens == 768  # static bound: round_up(150 + 4 * 127, 128)


def fp8_experts(recipe_name: str, align: int | None) -> RoutedExperts:
    torch.manual_seed(0)
    experts = RoutedExperts(len(SIZES), IN, IN)
    convert_to_fp8(experts, load_recipe(recipe_name), backend="emulated")
    for m in experts.modules():
        if isinstance(m, FP8GroupedLinear):
            m.tokens_align = align
    return experts


def experts_fwd_bwd(experts, x, token_index, sizes):
    x = x.clone().requires_grad_()
    y = experts(x, torch.tensor(sizes), token_index)
    y.backward(torch.ones_like(y))
    grads = [p.grad for p in experts.parameters()]
    experts.zero_grad(set_to_none=True)
    return y.detach(), x.grad, grads


@pytest.mark.parametrize("recipe_name", ["hybrid", "current"])
def test_tokens_cast_before_dispatch_take_the_padded_layout(recipe_name):
    """Gate and up share the FP8 rows gathered once; their token-major copy is gathered straight into
    the padded layout. A consumer with another layout re-casts (materialize): same results, its
    input gradient then reaches x through its own gather (another FP32 summation order)."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(60, IN, generator=gen)
    token_index = torch.randint(0, 60, (sum(SIZES),), generator=gen)
    ragged, padded, mixed = fp8_experts(recipe_name, None), fp8_experts(recipe_name, 128), fp8_experts(recipe_name, 128)
    mixed.up_proj.tokens_align = None
    (y0, gx0, gw0), (y1, gx1, gw1), (y2, gx2, gw2) = (experts_fwd_bwd(e, x, token_index, SIZES)
                                                      for e in (ragged, padded, mixed))
    assert torch.equal(y1, y0) and torch.equal(gx1, gx0) and torch.equal(y2, y0)
    torch.testing.assert_close(gx2, gx0, rtol=1e-6, atol=1e-6)
    for gw in (gw1, gw2):
        for a, b in zip(gw, gw0):  # emulated grad_weight: FP32 summation order (module docstring)
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_padded_block_compiles_as_one_graph():
    """fullgraph=True: a host read of the group sizes (a sync on the GPU) would be a graph break."""
    torch.manual_seed(0)
    eager = MoE(IN, MoEConfig(n_routed_experts=4, n_shared_experts=0, top_k=2, expert_ffn_hidden=IN))
    convert_to_fp8(eager, load_recipe("hybrid"), backend="emulated")
    for m in eager.modules():
        if isinstance(m, FP8GroupedLinear):
            m.tokens_align = 128
    compiled = copy.deepcopy(eager)
    call = torch.compile(compiled, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 16, IN)
    results = []
    for block, fn in ((eager, eager), (compiled, call)):
        xi = x.clone().requires_grad_()
        out, aux = fn(xi)
        out.sum().add(aux).backward()
        results.append((out.detach(), xi.grad, [p.grad for p in block.parameters()]))
    (ye, gxe, gwe), (yc, gxc, gwc) = results
    torch.testing.assert_close(yc, ye, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gxc, gxe, rtol=1e-5, atol=1e-5)
    for a, b in zip(gwc, gwe):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert_same_fp8_state(compiled, eager, "compiled")


def test_tokens_align_default_and_bad_values():
    assert default_tokens_align(load_recipe("hybrid"), "scaled_mm") == 128  # kernels: TMA pays
    assert default_tokens_align(load_recipe("hybrid"), "emulated") is None  # emulation: nothing to gain
    assert default_tokens_align(load_recipe("blockwise"), "emulated") == 128  # 128x1 tiles need it
    layer, _ = layer_pair("hybrid")
    with pytest.raises(ValueError, match=r"tokens_align=64 is not one of \[None, 128\]"):
        layer.tokens_align = 64
    blockwise = FP8GroupedLinear.from_grouped(GroupedLinear(2, IN, OUT), load_recipe("blockwise"), backend="emulated")
    with pytest.raises(ValueError, match="blockwise"):
        blockwise.tokens_align = None
