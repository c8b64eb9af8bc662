"""On an FP8 GPU: torch.compile (Inductor) traces the FP8 linear whole, Triton casts and cuBLAS
GEMMs included, and keeps the FP8 state exactly what eager mode computes."""

import copy

import pytest
import torch
import torch._dynamo

from fp8train.numerics import FP8Linear, after_optimizer_step, fp8_gemm_capability, load_recipe

ok, why = fp8_gemm_capability()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not ok, reason=why)]


@pytest.mark.parametrize("recipe_name", ["hybrid", "current", "blockwise"])
def test_compiled_fp8_linear_on_gpu(recipe_name):
    torch.manual_seed(0)
    base = torch.nn.Linear(1024, 512, bias=False, device="cuda", dtype=torch.bfloat16)
    eager = FP8Linear.from_linear(copy.deepcopy(base), load_recipe(recipe_name), backend="scaled_mm")
    compiled = FP8Linear.from_linear(copy.deepcopy(base), load_recipe(recipe_name), backend="scaled_mm")
    sample = torch.randn(512, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    explanation = torch._dynamo.explain(copy.deepcopy(compiled))(sample)  # a copy: explain runs it
    assert explanation.graph_break_count == 0, [b.reason for b in explanation.break_reasons]
    torch._dynamo.reset()
    call = torch.compile(compiled, fullgraph=True)
    for step in range(3):
        x = torch.randn(512, 1024, device="cuda", dtype=torch.bfloat16) * (step + 1)
        grad = torch.randn(512, 512, device="cuda", dtype=torch.bfloat16)
        xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
        ye, yc = eager(xe), call(xc)
        ye.backward(grad)
        yc.backward(grad)
        torch.testing.assert_close(yc, ye)
        torch.testing.assert_close(xc.grad, xe.grad)
        torch.testing.assert_close(compiled.weight.grad, eager.weight.grad)
        for layer in (eager, compiled):
            with torch.no_grad():
                layer.weight -= 0.01 * layer.weight.grad
            layer.weight.grad = None
            after_optimizer_step(layer)
        for (name, a), (_, b) in zip(eager.state_dict().items(), compiled.state_dict().items()):
            assert torch.equal(a, b), f"step {step}: {name} differs after the update"
    print(f"{recipe_name}: compiled == eager (FP8 state exact) over 3 steps, 0 graph breaks")
