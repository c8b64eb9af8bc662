"""GPTQ vs the reference algorithm (tests/ptq/reference_gptq.py, a faithful transcription of
IST-DASLab/gptq @2d65066): same layer, same calibration inputs -> identical integer codes, the same
dequantized weights and layer loss to float tolerance."""

import pytest
import torch

from fp8train.ptq.gptq import GptqOptions, HessianAccumulator, gptq_quantize
from fp8train.quant.spec import QuantSpec
from tests.ptq.reference_gptq import ref_fasterquant, ref_hessian


def _layer(n=48, k=96, seed=0, dead=(5, 40)):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(n, k, generator=gen) * 0.05
    inputs = [torch.randn(3, 16, k, generator=gen) * torch.linspace(0.2, 3.0, k) for _ in range(3)]
    for batch in inputs:
        batch[..., list(dead)] = 0.0  # dead input channels: H_ii = 0
    return weight, inputs


def _hessian(inputs):
    acc = HessianAccumulator(inputs[0].shape[-1])
    for batch in inputs:
        acc.add_batch(batch)
    return acc.hessian


def test_hessian_matches_reference():
    _, inputs = _layer()
    torch.testing.assert_close(_hessian(inputs), ref_hessian(inputs), rtol=0, atol=0)


CASES = [  # (format, symmetric, granularity, group, options, reference kwargs)
    ("uint4", False, "row", 0, {}, {}),
    ("uint4", False, "tile", 32, {"block_size": 40}, {"groupsize": 32, "blocksize": 40}),
    ("uint4", False, "tile", 32, {"act_order": True, "static_groups": True},
     {"groupsize": 32, "actorder": True, "static_groups": True}),
    ("uint8", False, "row", 0, {"act_order": True}, {"actorder": True}),
    ("int4", True, "tile", 16, {"reference_grid": True, "block_size": 24}, {"groupsize": 16, "blocksize": 24}),
    ("int8", True, "row", 0, {"reference_grid": True, "percdamp": 0.1}, {"percdamp": 0.1}),
]


@pytest.mark.parametrize("fmt,sym,gran,group,options,ref_kwargs", CASES)
def test_codes_and_loss_match_reference(fmt, sym, gran, group, options, ref_kwargs):
    weight, inputs = _layer()
    hessian = _hessian(inputs)
    spec = QuantSpec(fmt, gran, group or 128, sym)
    ours = gptq_quantize(weight, hessian, spec, GptqOptions(**options))
    bits = spec.bits
    q_ref, codes_ref, loss_ref = ref_fasterquant(weight, hessian, bits, sym, **ref_kwargs)
    codes = ours.quantized.data.to(torch.int32)
    if sym:  # the reference's unsigned codes with zero (maxq + 1) / 2 are our signed codes + 2^(b-1)
        codes = codes + 2 ** (bits - 1)
    assert torch.equal(codes, codes_ref.to(torch.int32))
    torch.testing.assert_close(ours.quantized.dequantize(), q_ref, rtol=1e-6, atol=1e-7)
    assert ours.loss == pytest.approx(loss_ref, rel=1e-5)


def test_core_asymmetric_grid_equals_reference_grid():
    """Default (core) grids and the reference's quirks coincide for asymmetric grids."""
    weight, inputs = _layer(seed=3)
    hessian = _hessian(inputs)
    spec = QuantSpec("uint4", "tile", 32, False)
    core = gptq_quantize(weight, hessian, spec, GptqOptions())
    quirks = gptq_quantize(weight, hessian, spec, GptqOptions(reference_grid=True))
    assert torch.equal(core.quantized.data, quirks.quantized.data)
    assert torch.equal(core.quantized.zero_point, quirks.quantized.zero_point)


def test_gptq_beats_rtn_on_layer_output():
    weight, inputs = _layer(seed=1, dead=())
    mixing = torch.randn(96, 96, generator=torch.Generator().manual_seed(7)) / 96 ** 0.5
    inputs = [b + b @ mixing for b in inputs]  # correlated input channels, as in real activations
    hessian = _hessian(inputs)
    spec = QuantSpec("uint4", "tile", 32, False)
    x = torch.cat([b.reshape(-1, b.shape[-1]) for b in inputs])
    gptq_w = gptq_quantize(weight, hessian, spec).quantized.dequantize()
    rtn_w = spec.quantize(weight).dequantize()
    err = lambda w: float(((x @ (w - weight).t()) ** 2).mean())  # noqa: E731
    assert err(gptq_w) < 0.75 * err(rtn_w)


def test_bad_options_are_refused():
    weight, inputs = _layer()
    with pytest.raises(ValueError, match="static_groups"):
        gptq_quantize(weight, _hessian(inputs), QuantSpec("uint4", "tile", 32, False), GptqOptions(act_order=True))
    with pytest.raises(ValueError, match="percdamp"):
        GptqOptions(percdamp=2.0)
    with pytest.raises(ValueError, match="integer grids"):
        gptq_quantize(weight, _hessian(inputs), QuantSpec("e4m3", "row"))
