"""torch.compile on a model with FP8 layers runs and computes what eager mode computes (the FP8
layers themselves stay eager: compile breaks the graph around them)."""

import torch

from fp8train.numerics import after_optimizer_step, convert_to_fp8, load_recipe


def test_compiled_model_with_fp8_layers_matches_eager():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(128, 128), torch.nn.GELU(), torch.nn.Linear(128, 128))
    convert_to_fp8(model, load_recipe("hybrid"), backend="emulated")
    x = torch.randn(32, 128)
    eager = model(x)
    compiled = torch.compile(model, backend="aot_eager")
    out = compiled(x)
    out.sum().backward()
    after_optimizer_step(model)
    assert torch.equal(out, eager)
    assert model[0].weight.grad is not None
