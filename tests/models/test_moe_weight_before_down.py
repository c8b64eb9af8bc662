"""MoEConfig.route_weight_before_down: routing weights multiplied into down_proj's input and a plain
sum as the combine give the same block (down_proj is linear), forward and every gradient, with and
without capacity drops; the unweighted combine (nn.combine_rows.sum_rows) on its own."""

import copy

import pytest
import torch

from fp8train.models import MoEConfig
from fp8train.models.moe import MoE
from fp8train.nn.combine_rows import sum_rows


def twin_blocks(**fields):
    base = dict(n_routed_experts=8, n_shared_experts=1, top_k=3, expert_ffn_hidden=16, score_func="sigmoid")
    base.update(fields)
    torch.manual_seed(0)
    after = MoE(32, MoEConfig(**base)).double()
    before = copy.deepcopy(after)
    before.config = MoEConfig(**base, route_weight_before_down=True)
    return after, before


@pytest.mark.parametrize("capacity_factor", [None, 0.5], ids=["drop_free", "drops"])
def test_same_block_forward_and_gradients(capacity_factor):
    after, before = twin_blocks(capacity_factor=capacity_factor)
    x = torch.randn(2, 24, 32, dtype=torch.float64)
    results = []
    for block in (after, before):
        xi = x.clone().requires_grad_(True)
        out, aux = block(xi)
        (out * torch.linspace(-1, 1, out.numel(), dtype=torch.float64).view_as(out)).sum().add(aux).backward()
        grads = {name: p.grad.clone() for name, p in block.named_parameters()}
        results.append((out.detach(), xi.grad, grads, block.last_stats["dropped"].item()))
    (out_a, gx_a, g_a, dropped_a), (out_b, gx_b, g_b, dropped_b) = results
    assert dropped_a == dropped_b and (capacity_factor is None) == (dropped_a == 0)
    # the weighted combine sums in FP32 even for FP64 rows (its design): FP32-level agreement
    close = dict(rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out_b, out_a, **close)
    torch.testing.assert_close(gx_b, gx_a, **close)
    assert g_a.keys() == g_b.keys() and "router.weight" in g_a
    for name in g_a:
        torch.testing.assert_close(g_b[name], g_a[name], **close, msg=name)
    assert g_a["router.weight"].abs().sum() > 0  # the routing weights' gradient reaches the router


def test_sum_rows_forward_and_gradcheck():
    rows = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    token_index = torch.tensor([2, 0, 2, 3, 0, 2, 3])
    out = sum_rows(rows, token_index, 5)
    want = torch.zeros(5, 5, dtype=torch.float64).index_add_(0, token_index, rows.detach())
    torch.testing.assert_close(out, want)
    assert torch.equal(out[1], torch.zeros(5, dtype=torch.float64)) and torch.equal(out[4], out[1])  # no rows
    assert torch.autograd.gradcheck(lambda r: sum_rows(r, token_index, 5), (rows,))


def test_flag_must_be_a_bool():
    with pytest.raises(ValueError, match="route_weight_before_down must be a bool"):
        MoEConfig(8, 0, 2, 16, route_weight_before_down="yes")
