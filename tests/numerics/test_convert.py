"""Module swap: which nn.Linear layers become FP8Linear, which stay high precision and why, the
same Parameter objects afterwards, and the backend reason on this machine."""

import pytest
import torch
from torch import nn

from fp8train.numerics import FP8Linear, convert_to_fp8, describe_backend, fp8_gemm_capability, load_recipe
from tests.numerics.helpers import sqnr


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(128, 128)
        self.gate_proj = nn.Linear(128, 256)  # an MLP gate projection: converted ("gate" alone is the router)
        self.gate = nn.Linear(128, 8)  # MoE gate (router)
        self.narrow = nn.Linear(128, 100)


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed_tokens = nn.Embedding(100, 128)
        self.embedding = nn.Linear(128, 128)  # e.g. a projection embedding
        self.blocks = nn.ModuleList([Block(), Block()])
        self.router = nn.Linear(128, 8)
        self.lm_head = nn.Linear(128, 100)
        self.output = nn.Linear(128, 128)


CONVERTED = [f"blocks.{i}.{name}" for i in range(2) for name in ("q_proj", "gate_proj", "narrow")]
HIGH_PRECISION = ["embedding", "blocks.0.gate", "blocks.1.gate", "router", "lm_head", "output"]


def test_default_filter_keeps_embedding_head_and_router_high_precision():
    model = Toy()
    report = convert_to_fp8(model, load_recipe("current"))
    assert report.converted == CONVERTED
    reasons = dict(report.skipped)
    assert sorted(reasons) == sorted(HIGH_PRECISION)
    assert all("stays in high precision" in why for why in reasons.values())
    assert "'lm_head'" in reasons["lm_head"] and "'gate'" in reasons["blocks.0.gate"]
    assert type(model.embed_tokens) is nn.Embedding and type(model.lm_head) is nn.Linear
    assert isinstance(model.blocks[1].gate_proj, FP8Linear)
    assert "converted 6 layer(s), skipped 6" in str(report)


def test_blockwise_skips_shapes_not_multiple_of_128_naming_the_size():
    model = Toy()
    report = convert_to_fp8(model, load_recipe("blockwise"))
    reasons = dict(report.skipped)
    assert "out_features=100" in reasons["blocks.0.narrow"] and "multiple of 128" in reasons["blocks.0.narrow"]
    assert report.converted == [n for n in CONVERTED if "narrow" not in n]
    assert type(model.blocks[0].narrow) is nn.Linear


def test_custom_filter_by_name_and_shape():
    def only_wide(fqn, module):
        if module.out_features < 200:
            return f"out_features={module.out_features} too narrow to pay off"
        return "blocks.1" not in fqn  # False: excluded without a reason of its own

    model = Toy()
    report = convert_to_fp8(model, load_recipe("current"), module_filter=only_wide)
    reasons = dict(report.skipped)
    assert report.converted == ["blocks.0.gate_proj"]
    assert reasons["blocks.1.gate_proj"] == "excluded by module_filter"
    assert reasons["lm_head"] == "out_features=100 too narrow to pay off"
    assert isinstance(model.router, nn.Linear) and not isinstance(model.router, FP8Linear)


def test_parameters_are_the_same_objects_after_the_swap():
    model = Toy()
    before = {name: p for name, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    convert_to_fp8(model, load_recipe("hybrid"), backend="emulated")
    after = dict(model.named_parameters())
    assert after.keys() == before.keys()
    assert all(after[name] is before[name] for name in before)
    layer = model.blocks[0].q_proj
    x = torch.randn(4, 128)
    layer(x).sum().backward()
    old = layer.weight.detach().clone()
    optimizer.step()  # the optimizer built before the swap updates the FP8 layer's master weight
    assert not torch.equal(layer.weight, old)


def test_converted_layer_computes_with_the_original_weights():
    linear = nn.Linear(128, 256)
    model = nn.Sequential(linear)
    convert_to_fp8(model, load_recipe("current"), backend="emulated")
    x = torch.randn(64, 128)
    with torch.no_grad():
        assert sqnr(linear(x), model(x)) >= 25.0
    assert model[0].weight is linear.weight and model[0].bias is linear.bias


def test_bf16_recipe_converts_nothing():
    model = Toy()
    report = convert_to_fp8(model, load_recipe("bf16"))
    assert report.converted == [] and report.skipped == [("*", "recipe 'bf16' has FP8 disabled")]
    assert not any(isinstance(m, FP8Linear) for m in model.modules())
    assert describe_backend(model) == "no FP8 layers (high precision GEMMs)"


def test_converting_twice_is_a_no_op():
    model = Toy()
    convert_to_fp8(model, load_recipe("current"))
    again = convert_to_fp8(model, load_recipe("current"))
    assert again.converted == []


def test_describe_backend_says_which_and_why():
    model = Toy()
    report = convert_to_fp8(model, load_recipe("current"))
    ok, why = fp8_gemm_capability()
    if ok:  # an FP8 GPU would pick scaled_mm; CPU CI checks the emulated path
        assert "scaled_mm" in describe_backend(model)
        return
    assert describe_backend(model) == f"auto -> emulated: {why}" == report.backend
    assert "no CUDA device" in why or "compute capability" in why
    forced = nn.Sequential(nn.Linear(128, 128))
    convert_to_fp8(forced, load_recipe("current"), backend="emulated")
    assert describe_backend(forced) == "emulated: requested by the recipe/config"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised where there is no GPU")
def test_te_backend_without_gpu_raises_with_reason():
    with pytest.raises(ValueError, match="backend=te is unavailable"):
        convert_to_fp8(Toy(), load_recipe("hybrid"), backend="te")
