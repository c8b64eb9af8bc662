"""torch.compile traces a whole FP8 MoE block (router, dispatch, FP8 experts, combine) as one graph.

The group sizes never leave the device and every shape is static, so `fullgraph=True` compiles the
block's forward and backward with the FP8 expert layers inside (emulated backend on CPU: the
grouped GEMMs' traced form, which never reads the offsets on the host). The compiled block computes
what the eager block computes: the FP8 state (amax histories, scales) bit for bit, outputs and
gradients to FP32 summation order (eager CPU multiplies each expert's rows as its own block, the
traced form masks full products: another BLAS shape, the same products).
"""

import copy

import pytest
import torch
import torch._dynamo

import kernels.library  # noqa: F401 (registers torch.ops.fp8train.*)
from fp8train.models.moe import MoE, MoEConfig
from fp8train.numerics import FP8GroupedLinear, after_optimizer_step, convert_to_fp8, load_recipe

DIM, HIDDEN, EXPERTS = 128, 128, 4


def fp8_block(recipe_name: str) -> MoE:
    torch.manual_seed(0)
    block = MoE(DIM, MoEConfig(n_routed_experts=EXPERTS, n_shared_experts=1, top_k=2, expert_ffn_hidden=HIDDEN))
    convert_to_fp8(block, load_recipe(recipe_name), backend="emulated")
    assert sum(isinstance(m, FP8GroupedLinear) for m in block.modules()) == 3
    return block


def fwd_bwd(block, call, x, grad):
    x = x.clone().requires_grad_()
    out, aux = call(x)
    (out * grad).sum().add(aux).backward()
    grads = {n: p.grad.clone() for n, p in block.named_parameters()}
    block.zero_grad(set_to_none=True)
    return out.detach(), x.grad, grads


@pytest.mark.parametrize("recipe_name", ["hybrid", "blockwise"])
def test_compiled_fp8_moe_block_is_one_graph_and_matches_eager(recipe_name):
    eager = fp8_block(recipe_name)
    compiled = copy.deepcopy(eager)
    call = torch.compile(compiled, backend="aot_eager", fullgraph=True)  # fullgraph: a break is an error
    for step in range(2):  # different tokens, so a different routing, through the same graph
        x, grad = torch.randn(2, 32, DIM) * (step + 1), torch.randn(2, 32, DIM)
        (ye, gxe, gwe), (yc, gxc, gwc) = fwd_bwd(eager, eager, x, grad), fwd_bwd(compiled, call, x, grad)
        torch.testing.assert_close(yc, ye, rtol=1e-5, atol=1e-5, msg=f"step {step}: output")
        torch.testing.assert_close(gxc, gxe, rtol=1e-5, atol=1e-5, msg=f"step {step}: grad_input")
        for name in gwe:
            torch.testing.assert_close(gwc[name], gwe[name], rtol=1e-4, atol=1e-5, msg=f"step {step}: {name}")
        for (name, a), (_, b) in zip(eager.state_dict().items(), compiled.state_dict().items()):
            if "caster" in name:
                assert torch.equal(a, b), f"step {step}: {name}"
        after_optimizer_step(eager)
        after_optimizer_step(compiled)


@pytest.mark.parametrize("recipe_name", ["current", "v3_fp8"])
def test_fp8_moe_block_has_no_graph_break(recipe_name):
    block = fp8_block(recipe_name)
    explanation = torch._dynamo.explain(block)(torch.randn(2, 32, DIM, requires_grad=True))
    assert explanation.graph_break_count == 0, [b.reason for b in explanation.break_reasons]
