"""A CUDA-graphed FP8 linear computes exactly what the eager one computes, step after step."""

import copy

import pytest
import torch

from fp8train.numerics import FP8Linear, after_optimizer_step, fp8_gemm_capability, load_recipe, make_graphed_fp8

ok, why = fp8_gemm_capability()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not ok, reason=why)]


@pytest.mark.parametrize("recipe_name", ["hybrid", "current", "blockwise"])
def test_graphed_fp8_linear_matches_eager_through_optimizer_steps(recipe_name):
    torch.manual_seed(0)
    base = torch.nn.Linear(512, 384, bias=True, device="cuda", dtype=torch.bfloat16)
    eager = FP8Linear.from_linear(copy.deepcopy(base), load_recipe(recipe_name), backend="scaled_mm")
    graphed = FP8Linear.from_linear(copy.deepcopy(base), load_recipe(recipe_name), backend="scaled_mm")
    after_optimizer_step(eager)  # both build their delayed banks before anything is compared
    sample = torch.randn(256, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    graphed_call = make_graphed_fp8(graphed, (sample,))
    opt_e = torch.optim.SGD(eager.parameters(), lr=0.1)
    opt_g = torch.optim.SGD(graphed.parameters(), lr=0.1)
    for step in range(4):
        eager.load_state_dict(graphed.state_dict())  # same weights and FP8 state (warm-up amaxes too)
        x = torch.randn(256, 512, device="cuda", dtype=torch.bfloat16) * (step + 1)
        grad = torch.randn(256, 384, device="cuda", dtype=torch.bfloat16)
        xe, xg = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        ye, yg = eager(xe), graphed_call(xg)
        ye.backward(grad)
        yg.backward(grad)
        assert torch.equal(ye, yg), f"step {step}: outputs differ"
        assert torch.equal(xe.grad, xg.grad), f"step {step}: grad_input differs"
        assert torch.equal(eager.weight.grad, graphed.weight.grad), f"step {step}: grad_weight differs"
        for opt, layer in ((opt_e, eager), (opt_g, graphed)):
            opt.step()
            opt.zero_grad(set_to_none=True)
            after_optimizer_step(layer)
        for (name, a), (_, b) in zip(eager.state_dict().items(), graphed.state_dict().items()):
            assert torch.equal(a, b), f"step {step}: {name} differs after the update"
    print(f"{recipe_name}: graphed == eager over 4 optimizer steps; weight casts {graphed.weight_casts}")
