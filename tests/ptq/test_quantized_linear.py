"""QuantizedLinear and RTN against the core's reference quantizers (exact where the math is exact)."""

import pytest
import torch

from fp8train.ptq.quantized_linear import QuantizedLinear, quantize_input, reference_forward
from fp8train.ptq.rtn import check_weight_shape, rtn_quantize
from fp8train.quant import reference
from fp8train.quant.packing import pack_4bit
from fp8train.quant.spec import QuantSpec

SPECS = [QuantSpec("uint4", "tile", 32, False), QuantSpec("int4", "tile", 16, True), QuantSpec("int8", "row"),
         QuantSpec("uint8", "row", symmetric=False), QuantSpec("e4m3", "row"), QuantSpec("e4m3", "block", 32)]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe())
def test_rtn_is_the_core_quantizer_and_forward_is_dequantize_matmul(spec):
    weight = torch.randn(64, 96)
    q = rtn_quantize(weight, spec)
    core = reference.quantize(weight, spec.fmt, spec.grid, symmetric=spec.symmetric)
    assert torch.equal(q.data.view(torch.uint8) if spec.fmt.is_float else q.data,
                       core.data.view(torch.uint8) if spec.fmt.is_float else core.data)
    assert torch.equal(q.scale_inv, core.scale_inv)
    layer = QuantizedLinear.from_weight(q, spec)
    x = torch.randn(3, 5, 96)
    torch.testing.assert_close(layer(x), x @ q.dequantize().t(), rtol=0, atol=0)


def test_w8a8_int8_is_the_exact_integer_gemm():
    spec_w, spec_x = QuantSpec("int8", "row"), QuantSpec("int8", "row")
    weight, x = torch.randn(48, 2048), torch.randn(7, 2048) * 3
    layer = QuantizedLinear.from_weight(rtn_quantize(weight, spec_w), spec_w, spec_x)
    xq, wq = quantize_input(layer, x), layer.weight_quantized()
    exact = (xq.data.long() @ wq.data.long().t()).double()  # INT32 accumulation, exactly
    expected = (exact.float() * xq.scale_inv * wq.scale_inv.reshape(1, -1))
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=0)


def test_static_input_scale_and_outliers():
    spec_w, spec_x = QuantSpec("int8", "row"), QuantSpec("int8", "tensor", dynamic=False)
    weight, x = torch.randn(16, 32), torch.randn(4, 32)
    x[:, 3] = 40.0
    with pytest.raises(ValueError, match="input_scale_inv"):
        QuantizedLinear.from_weight(rtn_quantize(weight, spec_w), spec_w, spec_x)
    main = weight.clone()
    main[:, 3] = 0
    layer = QuantizedLinear.from_weight(rtn_quantize(main, spec_w), spec_w, spec_x,
                                        input_scale_inv=torch.tensor(2.0 / 127), outlier_index=torch.tensor([3]),
                                        outlier_weight=weight[:, 3:4].clone())
    x_main = x.clone()
    x_main[:, 3] = 0
    xq = reference.quantize_with_step(x_main, spec_x.fmt, torch.tensor(2.0 / 127), None, spec_x.grid)
    expected = xq.dequantize() @ layer.weight_quantized().dequantize().t() + x[:, 3:4] @ weight[:, 3:4].t()
    torch.testing.assert_close(layer(x), expected, rtol=1e-6, atol=1e-5)


def test_kernel_hook_and_fallback():
    spec = QuantSpec("uint4", "tile", 32, False)
    layer = QuantizedLinear.from_weight(rtn_quantize(torch.randn(8, 64), spec), spec)
    x = torch.randn(2, 64)
    calls = []
    layer.kernel = lambda mod, inp: calls.append(1) or NotImplemented
    torch.testing.assert_close(layer(x), reference_forward(layer, x))
    layer.kernel = lambda mod, inp: torch.zeros(2, 8)
    assert torch.equal(layer(x), torch.zeros(2, 8)) and calls == [1]
    assert torch.equal(layer.packed_codes(), pack_4bit(layer.weight_codes))


def test_bad_shapes_and_pairs_are_refused():
    with pytest.raises(ValueError, match="group_size=128 does not divide in_features=576.*64"):
        check_weight_shape(QuantSpec("uint4", "tile", 128, False), 1536, 576, "layers.0.mlp.gate_proj")
    with pytest.raises(ValueError, match="W8A8 needs symmetric per-channel"):
        QuantizedLinear(64, 8, QuantSpec("uint4", "tile", 32, False), QuantSpec("int8", "row"))
