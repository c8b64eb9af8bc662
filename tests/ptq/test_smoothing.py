"""SmoothQuant and AWQ invariants: the scaled model computes the same function in float; scales as defined."""

import copy

import torch

from fp8train.ptq.awq import AwqOptions, search_clip, search_group_scale
from fp8train.ptq.config import PtqConfig
from fp8train.ptq.data import evaluate_perplexity
from fp8train.ptq.decoder import fold_scale, scale_groups
from fp8train.ptq.pipeline import quantize_decoder
from fp8train.ptq.plan import uniform_plan
from fp8train.ptq.smoothquant import smoothing_scales
from fp8train.quant.spec import QuantSpec
from tests.ptq.helpers import TINY_GQA, batches, tiny_model


def test_smoothing_scales_formula():
    act = torch.tensor([4.0, 1.0, 0.0])
    w1, w2 = torch.tensor([[1.0, -2.0, 0.5]]), torch.tensor([[-3.0, 0.5, 0.0]])
    s = smoothing_scales(act, [w1, w2], alpha=0.5)
    expected = (act.pow(0.5) / torch.tensor([3.0, 2.0, 0.5]).pow(0.5)).clamp(min=1e-5)
    torch.testing.assert_close(s, expected)


def test_folding_every_scale_group_keeps_the_float_function():
    for config in (None, TINY_GQA):
        model = tiny_model() if config is None else tiny_model(config)
        tokens = batches(1)[0]
        before = model(tokens)
        for block in model.layers:
            for group in scale_groups(block):
                width = block.get_submodule(group.linears[0]).in_features
                fold_scale(block.get_submodule(group.prev), torch.rand(width) * 4 + 0.25,
                           [block.get_submodule(p) for p in group.linears])
        torch.testing.assert_close(model(tokens), before, rtol=1e-4, atol=1e-4)
    assert [g.prev for g in scale_groups(tiny_model(TINY_GQA).layers[0])] == ["attn_norm", "ffn_norm", "mlp.up_proj"]


def test_awq_scale_is_normalized_and_clip_does_not_hurt():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32, bias=False)
    x = torch.randn(128, 64) * torch.linspace(0.1, 5, 64)
    spec = QuantSpec("uint4", "tile", 32, False)
    s = search_group_scale(x, [linear], [spec], linear, grid=10)
    assert s.shape == (64,) and float(s.max() * s.min()) == pytest_approx(1.0)
    clipped = search_clip(linear.weight.data, x, spec, AwqOptions())
    err = lambda w: float(((x @ (spec.quantize(w).dequantize() - linear.weight.data).t()) ** 2).mean())  # noqa: E731
    assert err(clipped) <= err(linear.weight.data) + 1e-9


def pytest_approx(value):
    import pytest
    return pytest.approx(value, rel=1e-4)


def test_methods_run_and_stay_close_to_float():
    model, calib = tiny_model(), batches(count=1, batch=2)
    windows = torch.randint(0, 97, (4, 17), generator=torch.Generator().manual_seed(5))
    base = evaluate_perplexity(model, windows)["loss"]
    presets = [{"method": "smoothquant", "weight": {"format": "int8", "granularity": "row"},
                "input": {"format": "int8", "granularity": "tensor", "dynamic": False}},
               {"method": "awq", "weight": {"format": "uint4", "granularity": "tile", "group_size": 32,
                                            "symmetric": False}, "awq": {"grid": 4}},
               {"method": "rtn", "weight": {"format": "int8", "granularity": "row"},
                "input": {"format": "int8", "granularity": "row"}, "outliers": {"threshold": 1.0}}]
    for raw in presets:
        config = PtqConfig.from_dict(raw)
        quantized = copy.deepcopy(model)
        report = quantize_decoder(quantized, config, uniform_plan(config.weight, config.input), calib)
        assert len(report.layers) == 14
        assert abs(evaluate_perplexity(quantized, windows)["loss"] - base) < 0.05
