"""dispatch / combine bookkeeping and the GroupedLinear implementations."""

import pytest
import torch

from fp8train.models import GroupedLinear, combine, dispatch
from fp8train.nn.grouped_linear import (grouped_linear, grouped_linear_grouped_mm,
                                            grouped_linear_loop, grouped_mm_applicable)


def random_routing(num_tokens: int, num_experts: int, top_k: int) -> torch.Tensor:
    """Distinct experts per token, like torch.topk would give: [N, k]."""
    return torch.rand(num_tokens, num_experts).argsort(dim=-1)[:, :top_k]


def test_dispatch_groups_rows_by_expert_in_token_order():
    x = torch.randn(10, 4)
    topk_idx = random_routing(10, 5, 2)
    x_sorted, group_sizes, plan = dispatch(x, topk_idx, num_experts=5)
    assert x_sorted.shape == (20, 4) and group_sizes.tolist() == torch.bincount(
        topk_idx.flatten(), minlength=5).tolist()
    experts_of_rows = topk_idx[plan.token_index, plan.slot_index]
    assert torch.equal(experts_of_rows, experts_of_rows.sort().values)  # contiguous groups
    for expert in range(5):
        tokens = plan.token_index[experts_of_rows == expert]
        assert torch.equal(tokens, tokens.sort().values)  # stable: token order kept per expert
    assert torch.equal(x_sorted, x[plan.token_index])


def test_drop_free_every_token_reaches_exactly_k_distinct_experts():
    topk_idx = random_routing(64, 8, 3)
    _, group_sizes, plan = dispatch(torch.randn(64, 4), topk_idx, num_experts=8)
    assert int(plan.num_dropped) == 0 and int(group_sizes.sum()) == 64 * 3
    assert torch.equal(torch.bincount(plan.token_index, minlength=64), torch.full((64,), 3))
    experts_of_rows = topk_idx[plan.token_index, plan.slot_index]
    pairs = set(zip(plan.token_index.tolist(), experts_of_rows.tolist()))
    assert pairs == {(n, e) for n in range(64) for e in topk_idx[n].tolist()}


@pytest.mark.parametrize("top_k, weight", [(1, 1.0), (2, 0.5), (4, 0.25)])
def test_dispatch_then_combine_with_identity_experts_is_exact(top_k, weight):
    x = torch.randn(33, 16)
    topk_idx = random_routing(33, 8, top_k)
    x_sorted, _, plan = dispatch(x, topk_idx, num_experts=8)
    topk_weight = torch.full((33, top_k), weight)  # weights summing to 1, exact in binary
    assert torch.equal(combine(x_sorted, topk_weight, plan, 33), x)


def test_combine_applies_each_assignments_weight_and_keeps_dtype():
    x = torch.randn(6, 3, dtype=torch.bfloat16)
    topk_idx = random_routing(6, 4, 2)
    topk_weight = torch.rand(6, 2, requires_grad=True)
    x_sorted, _, plan = dispatch(x, topk_idx, num_experts=4)
    out = combine(x_sorted, topk_weight, plan, 6)
    assert out.dtype == torch.bfloat16
    expected = (x.float() * topk_weight.sum(-1, keepdim=True)).bfloat16()
    assert torch.allclose(out.float(), expected.float(), rtol=1e-2)
    out.float().sum().backward()
    assert topk_weight.grad is not None and topk_weight.grad.abs().sum() > 0


def test_capacity_drops_overflow_and_counts_it():
    x = torch.randn(16, 4)
    topk_idx = torch.zeros(16, 1, dtype=torch.long)  # every token wants expert 0
    topk_idx[12:] = 2
    x_sorted, group_sizes, plan = dispatch(x, topk_idx, num_experts=4, capacity=3)
    assert group_sizes.tolist() == [3, 0, 3, 0]
    assert int(plan.num_dropped) == 10 and plan.num_assignments == 16
    assert plan.token_index.tolist() == [0, 1, 2, 12, 13, 14]  # first come, first served
    out = combine(x_sorted, torch.ones(16, 1), plan, 16)
    assert torch.equal(out[[0, 1, 2, 12, 13, 14]], x[[0, 1, 2, 12, 13, 14]])
    assert torch.equal(out[3:12], torch.zeros(9, 4)) and torch.equal(out[15], torch.zeros(4))


def test_dispatch_rejects_bad_arguments():
    x = torch.randn(4, 2)
    with pytest.raises(ValueError, match="num_experts=3"):
        dispatch(x, torch.tensor([[0], [1], [2], [3]]), num_experts=3)
    with pytest.raises(ValueError, match="topk_idx must be"):
        dispatch(x, torch.zeros(3, 1, dtype=torch.long), num_experts=3)
    with pytest.raises(ValueError, match="capacity"):
        dispatch(x, torch.zeros(4, 1, dtype=torch.long), num_experts=3, capacity=-1)


def dense_reference(x, weight, group_sizes):
    """Row by row: each row multiplied by its own expert's weight, selected by a boolean mask."""
    expert_of_row = torch.repeat_interleave(torch.arange(weight.shape[0]), group_sizes)
    out = torch.empty(x.shape[0], weight.shape[1], dtype=x.dtype)
    for expert in range(weight.shape[0]):
        rows = expert_of_row == expert
        out[rows] = torch.nn.functional.linear(x[rows], weight[expert])
    return out


def test_grouped_linear_loop_equals_dense_reference_exactly():
    layer = GroupedLinear(num_experts=5, in_features=24, out_features=40)
    group_sizes = torch.tensor([3, 0, 7, 1, 9])
    x = torch.randn(20, 24)
    out = layer(x, group_sizes)
    assert out.shape == (20, 40)
    assert torch.equal(out, dense_reference(x, layer.weight.detach(), group_sizes))
    float64 = torch.cat([xe.double() @ layer.weight[e].double().T for e, xe in
                         enumerate(torch.split(x, group_sizes.tolist()))])
    assert torch.allclose(out.double(), float64, atol=1e-5)


def test_grouped_linear_gradients_match_float64_reference():
    layer = GroupedLinear(num_experts=3, in_features=8, out_features=6)
    group_sizes = torch.tensor([4, 0, 5])
    x = torch.randn(9, 8, requires_grad=True)
    grad_output = torch.randn(9, 6)
    layer(x, group_sizes).backward(grad_output)
    w64 = layer.weight.detach().double()
    rows = torch.repeat_interleave(torch.arange(3), group_sizes)
    grad_input = torch.einsum("to,toi->ti", grad_output.double(), w64[rows])
    grad_weight = torch.zeros_like(w64).index_add_(
        0, rows, torch.einsum("to,ti->toi", grad_output.double(), x.detach().double()))
    assert torch.allclose(x.grad.double(), grad_input, atol=1e-5)
    assert torch.allclose(layer.weight.grad.double(), grad_weight, atol=1e-5)
    assert torch.equal(layer.weight.grad[1], torch.zeros(6, 8))  # unused expert: zero grad


def test_grouped_linear_follows_autocast_like_f_linear():
    layer = GroupedLinear(num_experts=3, in_features=16, out_features=8)
    group_sizes = torch.tensor([2, 5, 1])
    x = torch.randn(8, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x, group_sizes)
    expected = grouped_linear_loop(x.bfloat16(), layer.weight.bfloat16(), group_sizes)
    assert out.dtype == torch.bfloat16 and torch.equal(out, expected)


def test_grouped_mm_not_applicable_on_cpu_fp32_with_reason():
    ok, reason = grouped_mm_applicable(torch.randn(4, 16), torch.randn(2, 16, 16))
    assert not ok and reason


def test_grouped_linear_validates_inputs():
    layer = GroupedLinear(2, 4, 4)
    with pytest.raises(ValueError, match="group_sizes"):
        layer(torch.randn(3, 4), torch.tensor([3]))
    with pytest.raises(ValueError, match="input must be"):
        layer(torch.randn(3, 5), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="num_experts"):
        GroupedLinear(0, 4, 4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_grouped_mm_path_matches_loop_on_cuda_bf16():
    weight = torch.randn(4, 64, 32, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    group_sizes = torch.tensor([5, 0, 17, 10], device="cuda")
    x = torch.randn(32, 32, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    assert grouped_mm_applicable(x, weight)[0]
    fast = grouped_linear_grouped_mm(x, weight, group_sizes)
    loop = grouped_linear_loop(x, weight, group_sizes)
    assert torch.allclose(fast.float(), loop.float(), rtol=2e-2, atol=2e-2)
    grad_output = torch.randn_like(fast)
    fast_grads = torch.autograd.grad(fast, (x, weight), grad_output)
    loop_grads = torch.autograd.grad(loop, (x, weight), grad_output)
    for fast_grad, loop_grad in zip(fast_grads, loop_grads):
        assert torch.allclose(fast_grad.float(), loop_grad.float(), rtol=2e-2, atol=5e-2)
    assert torch.equal(grouped_linear(x, weight, group_sizes), fast)
