"""The MoE combine and the dispatch gather's backward as gathers (kernels/moe_combine.py): Triton (GPU, or the interpreter on CPU) and
the torch fallback against a float64 reference, the autograd function against the scatter form of
fp8train.models.dispatch.combine, and the errors on bad input."""

from __future__ import annotations

import pytest
import torch

from fp8train.models.dispatch import assignment_rows, dispatch_plan
from fp8train.nn.combine_rows import GatherRowsByToken, combine_rows
from kernels import fallback, ops


def _case(device: str, tokens=37, k=3, experts=5, width=200, dtype=torch.bfloat16, capacity=None, seed=0):
    """Routed rows in dispatch order, their routing weights and the assignment -> row map."""
    g = torch.Generator().manual_seed(seed)
    topk_idx = torch.stack([torch.randperm(experts, generator=g)[:k] for _ in range(tokens)]).to(device)
    weight = torch.rand(tokens, k, generator=g).to(device)
    _, plan = dispatch_plan(topk_idx, experts, capacity)
    y = torch.randn(plan.token_index.shape[0], width, generator=g).to(device, dtype)
    return y, weight, plan, assignment_rows(plan, k)


def _reference(y, weight, pos):
    """float64 out[n] = sum_j w[n, j] * y[pos[n * k + j]] (dropped: 0)."""
    n, k = weight.shape
    rows = y.double()[pos.clamp(min=0)] * (pos >= 0)[:, None]
    return (rows.view(n, k, -1) * weight.double()[..., None]).sum(1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("capacity", [None, 14])
def test_forward_and_backward_match_float64(device, dtype, capacity):
    y, weight, plan, pos = _case(device, dtype=dtype, capacity=capacity)
    if capacity is not None:
        assert (pos < 0).any()  # some assignments dropped
    want = _reference(y, weight, pos)
    for impl in (ops, fallback):
        got = impl.combine_rows(y, weight, pos)
        assert got.dtype == dtype and got.shape == want.shape
        # one rounding of an FP32 sum to the output dtype
        tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-2, "rtol": 8e-3}
        torch.testing.assert_close(got.double(), want, **tol)

    grad_out = torch.randn(want.shape, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    y64, w64 = y.double().requires_grad_(), weight.double().requires_grad_()
    _reference(y64, w64, pos).backward(grad_out.double())
    for impl in (ops, fallback):
        grad_y, grad_w = impl.combine_rows_backward(grad_out, y, weight, pos)
        assert grad_y.dtype == dtype and grad_w.dtype == torch.float32
        tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-2, "rtol": 8e-3}
        torch.testing.assert_close(grad_y.double(), y64.grad, **tol)
        torch.testing.assert_close(grad_w.view_as(weight).double(), w64.grad, atol=1e-4, rtol=1e-5)


def test_autograd_function_matches_the_scatter_form(device):
    """combine_rows (the gather) vs dispatch.combine's index_add path: outputs and the gradients of
    the expert rows and of the routing weights."""
    y, weight, plan, pos = _case(device, tokens=64, k=2, experts=4, width=96, dtype=torch.float32)
    grad_out = torch.randn(64, 96, generator=torch.Generator().manual_seed(2)).to(device)
    results = []
    for gather in (True, False):
        y_ = y.clone().requires_grad_()
        w_ = weight.clone().requires_grad_()
        if gather:
            out = combine_rows(y_, w_, pos)
        else:  # the scatter form, whatever device: the code of dispatch.combine's fallback branch
            gate = w_[plan.token_index, plan.slot_index]
            out = torch.zeros(64, 96, device=device).index_add(0, plan.token_index, y_ * gate[:, None])
        out.backward(grad_out)
        results.append((out.detach(), y_.grad, w_.grad))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_every_assignment_dropped_gives_zeros(device):
    """Capacity 0: no expert row at all; the combine is zero and so are the weight gradients."""
    y, weight, _, pos = _case(device, capacity=0)
    assert y.shape[0] == 0 and (pos < 0).all()
    for impl in (ops, fallback):
        assert torch.equal(impl.combine_rows(y, weight, pos), torch.zeros(37, 200, dtype=y.dtype, device=device))
        grad_y, grad_w = impl.combine_rows_backward(torch.ones(37, 200, dtype=y.dtype, device=device), y, weight, pos)
        assert grad_y.shape == (0, 200) and torch.equal(grad_w, torch.zeros(37 * 3, device=device))


def test_bad_input_is_a_clear_error(device):
    y, weight, _, pos = _case(device)
    with pytest.raises(ValueError, match="pos must be int64"):
        ops.combine_rows(y, weight, pos.int())
    with pytest.raises(ValueError, match=r"pos must be int64 \[N \* k"):
        ops.combine_rows(y, weight, pos[:-1])
    with pytest.raises(ValueError, match="row-major y"):
        ops.combine_rows(y.t().contiguous().t(), weight, pos)
    with pytest.raises(ValueError, match="grad_out must be row-major"):
        ops.combine_rows_backward(torch.zeros(3, 3, device=device, dtype=y.dtype), y, weight, pos)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("capacity", [None, 14])
def test_dispatch_backward_sums_each_tokens_rows(device, dtype, capacity):
    """sum_rows_by_token (Triton, fallback) vs a float64 index_add: every token's rows summed, tokens
    with fewer rows (dropped assignments) or none at all included."""
    _, _, plan, _ = _case(device, capacity=capacity)
    token_index, tokens = plan.token_index, 37
    counts = torch.bincount(token_index.cpu(), minlength=tokens)
    assert counts.max() == 3 and (capacity is None) == bool((counts == 3).all())
    grad_rows = torch.randn(token_index.shape[0], 200, generator=torch.Generator().manual_seed(3)).to(device, dtype)
    want = torch.zeros(tokens, 200, dtype=torch.float64, device=device).index_add(0, token_index, grad_rows.double())
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-2, "rtol": 8e-3}
    for impl in (ops, fallback):
        got = impl.sum_rows_by_token(grad_rows, token_index, tokens)
        assert got.dtype == dtype and got.shape == (tokens, 200)
        torch.testing.assert_close(got.double(), want, **tol)


def test_gather_function_matches_indexing(device):
    x = torch.randn(37, 96, generator=torch.Generator().manual_seed(4)).to(device).requires_grad_()
    _, _, plan, _ = _case(device, capacity=14)
    grad = torch.randn(plan.token_index.shape[0], 96, generator=torch.Generator().manual_seed(5)).to(device)
    rows = GatherRowsByToken.apply(x, plan.token_index)
    (want,) = torch.autograd.grad(x[plan.token_index], x, grad)
    (got,) = torch.autograd.grad(rows, x, grad)
    assert torch.equal(rows, x[plan.token_index])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_dispatch_backward_bad_input(device):
    with pytest.raises(ValueError, match="token_index must be int64"):
        ops.sum_rows_by_token(torch.zeros(4, 8, device=device), torch.zeros(4, dtype=torch.int32, device=device), 2)
    with pytest.raises(ValueError, match="row-major grad_rows"):
        ops.sum_rows_by_token(torch.zeros(8, 4, device=device).t(), torch.zeros(4, dtype=torch.int64, device=device), 2)
