"""QAT: presets are QuantSpec data, the STE fake quantizer is the core's reference forward with an
identity backward, apply_qat trains a model against exactly the RTN export, and QAT on a toy
regression lowers the post-RTN loss."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fp8train import models
from fp8train.qat import (QATLinear, apply_qat, fake_quantize_ste, list_presets, load_preset, preset_from_dict,
                          rtn_quantize_weights_)
from fp8train.quant import reference
from fp8train.quant.spec import QuantSpec

W4_G128 = QuantSpec(format="uint4", granularity="tile", group_size=128, symmetric=False)


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return models.build_model(models.model_config("tiny", 64, 32))


def test_presets_load_and_w4_matches_the_ptq_rtn_quantizer():
    assert {"w4_g128", "w8", "w8a8"} <= set(list_presets())
    w4 = load_preset("w4_g128")
    assert w4.weight == W4_G128 and w4.input is None
    w8a8 = load_preset("w8a8")
    assert w8a8.weight == QuantSpec(format="int8", granularity="row") and w8a8.input.granularity == "row"


def test_bad_presets_name_the_problem():
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['wieght'\]"):
        preset_from_dict({"name": "x", "wieght": {"format": "int8"}})
    with pytest.raises(ValueError, match="quantizes nothing"):
        preset_from_dict({"name": "x", "weight": None})
    with pytest.raises(ValueError, match="qat.weight: format='int4' with symmetric=False"):
        preset_from_dict({"name": "x", "weight": {"format": "int4", "granularity": "row", "symmetric": False}})
    with pytest.raises(ValueError, match=r"available presets: \[.*'w4_g128'"):
        load_preset("w3_g7")


@pytest.mark.parametrize("spec", [W4_G128, QuantSpec(format="int8", granularity="row")])
def test_ste_forward_is_the_reference_and_backward_is_identity(spec):
    x = torch.randn(3, 5, 256, requires_grad=True)
    y = fake_quantize_ste(x, spec)
    expected = reference.fake_quantize(x.detach().reshape(15, 256), spec.fmt, spec.grid,
                                       symmetric=spec.symmetric).reshape(3, 5, 256)
    assert torch.equal(y, expected)
    assert not torch.equal(y, x)  # it really quantized
    grad = torch.randn_like(y)
    y.backward(grad)
    assert torch.equal(x.grad, grad)


def test_apply_qat_equals_training_the_rtn_export():
    """QAT forward == the RTN-exported model's forward, and the STE gradient on the master
    weights == the exported model's gradient on its quantized weights, bit for bit."""
    qat_model, export = tiny_model(), tiny_model()
    params_before = dict(qat_model.named_parameters())
    keys_before = set(qat_model.state_dict())
    report = apply_qat(qat_model, load_preset("w4_g128"))
    assert len(report.trained) == 14 and [name for name, _ in report.skipped] == ["lm_head"]
    assert isinstance(qat_model.layers[0].mlp.down_proj, QATLinear)
    assert set(qat_model.state_dict()) == keys_before  # no new state: checkpoints carry over
    assert all(p is params_before[n] for n, p in qat_model.named_parameters())  # optimizers stay valid
    assert len(rtn_quantize_weights_(export, W4_G128)) == 14
    ids = torch.randint(0, 64, (2, 32))
    loss_qat, loss_export = qat_model(ids, ids), export(ids, ids)
    assert torch.equal(loss_qat, loss_export)
    loss_qat.backward()
    loss_export.backward()
    for name, p in qat_model.named_parameters():
        assert torch.equal(p.grad, dict(export.named_parameters())[name].grad), name


@pytest.mark.parametrize("recipe", ["v3_fp8", "current", "blockwise"])
def test_qat_on_an_fp8_recipe_equals_the_fp8_model_of_the_rtn_export(recipe):
    """Under FP8 the fake-quantized weight goes through the layer's weight_transform slot: the FP8
    GEMMs see cast(fq(W)), exactly what the FP8 model of the RTN-exported weights computes."""
    from fp8train.numerics import FP8Linear, convert_to_fp8, load_recipe

    qat_model, export = tiny_model(), tiny_model()
    for m in (qat_model, export):
        convert_to_fp8(m, load_recipe(recipe), backend="emulated")
    report = apply_qat(qat_model, load_preset("w4_g128"))
    assert len(report.trained) == 14
    layer = qat_model.layers[0].attn.q_proj
    assert isinstance(layer, FP8Linear) and layer.weight_transform is not None
    rtn_quantize_weights_(export, W4_G128)
    ids = torch.randint(0, 64, (4, 32))
    loss_qat, loss_export = qat_model(ids, ids), export(ids, ids)
    assert torch.equal(loss_qat, loss_export)
    loss_qat.backward()
    loss_export.backward()
    grads = dict(export.named_parameters())
    assert all(torch.equal(p.grad, grads[n].grad) for n, p in qat_model.named_parameters())


def test_w8a8_quantizes_inputs_too():
    layer = nn.Linear(128, 32)
    model = nn.Sequential(layer)
    apply_qat(model, load_preset("w8a8"))
    x = torch.randn(4, 128)
    spec = QuantSpec(format="int8", granularity="row")
    expected = nn.functional.linear(spec.fake_quantize(x), spec.fake_quantize(layer.weight), layer.bias)
    assert torch.equal(model(x), expected)


def test_shape_that_does_not_split_into_groups_is_refused_before_any_change():
    model = nn.Sequential(nn.Linear(128, 16), nn.Linear(16, 96))
    with pytest.raises(ValueError, match=r"1\.weight: inner dimension.16 is not a multiple of 128"):
        apply_qat(model, load_preset("w4_g128"))
    assert type(model[0]) is nn.Linear  # nothing swapped


def test_qat_lowers_the_post_rtn_loss_of_a_regression():
    """y = x W*^T with CORRELATED inputs, W fitted exactly (least squares), then fine-tuned with W4
    QAT (Adam, LR decaying to 0): the RTN-W4 export's loss must drop. With uncorrelated inputs
    RTN is already the best grid point per weight and STE QAT only oscillates around rounding
    boundaries (Nagel et al. 2022); correlations let QAT trade errors between weights, as GPTQ does."""
    torch.manual_seed(0)
    x = torch.randn(256, 128) @ (torch.randn(128, 128) / 128 ** 0.5 + 0.1 * torch.eye(128))
    y = nn.Linear(128, 16, bias=False)(x).detach()
    layer = nn.Linear(128, 16, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.linalg.lstsq(x, y).solution.t())

    def rtn_loss() -> float:
        with torch.no_grad():
            return float(((x @ W4_G128.fake_quantize(layer.weight).t() - y) ** 2).mean())

    before = rtn_loss()
    model = nn.Sequential(layer)
    apply_qat(model, load_preset("w4_g128"))
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 - step / 40)
    for _ in range(40):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
        schedule.step()
    assert rtn_loss() < 0.85 * before, (rtn_loss(), before)
