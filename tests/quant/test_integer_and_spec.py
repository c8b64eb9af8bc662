"""Integer quantization, 4-bit packing, QuantSpec and the scheme table of the core.

Integer codes are checked element by element against a float64 reference written with explicit
loops (round half to even, the GPTQ/AWQ zero-point convention), exactly."""

import math

import pytest
import torch

from fp8train.quant import (E4M3, INT4, INT8, SCHEMES, UINT4, UINT8, GemmClass, Granularity, QuantizedTensor,
                            RecipeScaling, ScalingMode, quantize)
from fp8train.quant.packing import pack_4bit, unpack_4bit
from fp8train.quant.reference import quantize_with_step
from fp8train.quant.spec import QuantSpec


def ref_int_group(values: list[float], fmt, symmetric: bool) -> tuple[list[int], float, float | None]:
    """(codes, step, zero) of one group in float64, rounded like FP32 where torch computes in FP32."""
    f32 = lambda v: float(torch.tensor(v, dtype=torch.float32))  # noqa: E731
    lo, hi = min(min(values), 0.0), max(max(values), 0.0)
    if symmetric:
        step = f32(f32(max(abs(lo), abs(hi))) / fmt.max) or 1.0
        codes = [int(max(-fmt.max, min(fmt.max, round(f32(v / step))))) for v in values]
        return codes, step, None
    step = f32(f32(hi - lo) / fmt.max) or 1.0
    zero = max(fmt.min, min(fmt.max, round(f32(-lo / step))))
    codes = [int(max(fmt.min, min(fmt.max, round(f32(v / step)) + zero))) for v in values]
    return codes, step, float(zero)


@pytest.mark.parametrize("fmt, symmetric", [(INT8, True), (INT4, True), (UINT8, False), (UINT4, False)])
@pytest.mark.parametrize("granularity", [Granularity.row(), Granularity.tile(32)])
def test_integer_codes_match_float64_reference_group_by_group(fmt, symmetric, granularity):
    x = torch.randn(6, 64) * torch.exp2(torch.randint(-6, 6, (6, 1)).float())
    x[2, :32] = 0.0  # an all-zero group: step 1, codes decode to exact zeros
    q = quantize(x, fmt, granularity, symmetric=symmetric)
    size = 64 if granularity.kind.value == "row" else 32
    for r in range(6):
        for g in range(64 // size):
            codes, step, zero = ref_int_group(x[r, g * size:(g + 1) * size].tolist(), fmt, symmetric)
            assert q.data[r, g * size:(g + 1) * size].tolist() == codes
            assert q.scale_inv.reshape(6, -1)[r, g].item() == step
            if zero is not None:
                assert q.zero_point.reshape(6, -1)[r, g].item() == zero
    assert (q.dequantize()[2, :32] == 0).all()


def test_round_half_to_even_and_symmetric_clip():
    x = torch.tensor([[0.5, 1.5, 2.5, -0.5, -1.5, 127.0]])
    q = quantize_with_step(x, INT8, torch.tensor([[1.0]]), None, Granularity.row())
    assert q.data.tolist() == [[0, 2, 2, 0, -2, 127]]
    big = quantize_with_step(torch.tensor([[-500.0, 500.0]]), INT8, torch.tensor([[1.0]]), None, Granularity.row())
    assert big.data.tolist() == [[-127, 127]]  # symmetric grid: -128 unused


def test_asymmetric_dequantize_uses_zero_point_and_error_is_small():
    x = torch.rand(16, 256) * 3 + 0.5  # all positive: asymmetric grids pay off
    q = quantize(x, UINT4, Granularity.tile(64), symmetric=False)
    assert q.zero_point is not None and q.zero_point.dtype == torch.uint8
    manual = (q.data.float() - q.zero_point.float().repeat_interleave(64, 1)) * q.scale_inv.repeat_interleave(64, 1)
    assert torch.equal(q.dequantize(), manual)
    assert ((q.dequantize() - x).abs() <= q.scale_inv.repeat_interleave(64, 1) / 2 + 1e-6).all()


def test_symmetric_needs_signed_and_asymmetric_unsigned():
    with pytest.raises(ValueError, match="signed format"):
        quantize(torch.randn(4, 8), UINT4, Granularity.row(), symmetric=True)
    with pytest.raises(ValueError, match="unsigned format"):
        quantize(torch.randn(4, 8), INT4, Granularity.row(), symmetric=False)


def test_group_that_does_not_divide_names_the_dimension():
    with pytest.raises(ValueError, match="inner dimension=576 is not a multiple of 128"):
        quantize(torch.randn(4, 576), INT4, Granularity.tile(128))


@pytest.mark.parametrize("fmt", [INT4, UINT4])
def test_4bit_packing_round_trip_and_layout(fmt):
    codes = torch.randint(int(fmt.min), int(fmt.max) + 1, (5, 12)).to(fmt.dtype)
    packed = pack_4bit(codes)
    assert packed.shape == (5, 6) and packed.dtype == torch.uint8
    assert int(packed[0, 0]) == (int(codes[0, 0]) & 0xF) | ((int(codes[0, 1]) & 0xF) << 4)
    assert torch.equal(unpack_4bit(packed, fmt), codes)
    with pytest.raises(ValueError, match="even number of columns"):
        pack_4bit(codes[:, :3])


def test_quant_spec_from_yaml_data_and_errors():
    spec = QuantSpec.from_dict({"format": "uint4", "granularity": "tile", "group_size": 128, "symmetric": False})
    assert spec.grid == Granularity.tile(128) and spec.bits == 4 and spec.describe() == "uint4 asym tile(1x128)"
    x = torch.randn(8, 256)
    assert torch.equal(spec.fake_quantize(x), quantize(x, UINT4, Granularity.tile(128), symmetric=False).dequantize())
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['groups'\]"):
        QuantSpec.from_dict({"format": "int8", "groups": 4})
    with pytest.raises(ValueError, match="granularity='channel' is not allowed"):
        QuantSpec.from_dict({"format": "int8", "granularity": "channel"})
    with pytest.raises(ValueError, match="unknown number format 'int3'"):
        QuantSpec.from_dict({"format": "int3"})


def test_quant_spec_kind_is_the_enum_and_the_data_stays_a_string():
    from fp8train.quant.granularity import GranularityKind

    spec = QuantSpec("int4", GranularityKind.TILE, 32)
    assert spec == QuantSpec("int4", "tile", 32) and spec.to_dict()["granularity"] == "tile"
    assert spec.kind is GranularityKind.TILE and spec.grouped and spec.grid == Granularity.tile(32)
    assert QuantSpec("int8").kind is GranularityKind.ROW and not QuantSpec("int8").grouped
    with pytest.raises(ValueError, match=r"granularity='channel' is not allowed; choose one of \['tensor', 'row'"):
        QuantSpec("int8", "channel")


def test_scheme_table_covers_every_recipe_scaling_and_role():
    for scaling in RecipeScaling:
        for is_weight in (False, True):
            scheme = SCHEMES[(scaling, is_weight)]
            assert (scheme.mode is ScalingMode.DELAYED) == (scaling is RecipeScaling.DELAYED)
            assert scheme.reuses_transpose == scheme.granularity.transposable
    assert SCHEMES[(RecipeScaling.BLOCKWISE, True)].granularity == Granularity.block(128)
    assert SCHEMES[(RecipeScaling.BLOCKWISE, False)].kernel_cols == "quantize_1x128_t"
    assert SCHEMES[(RecipeScaling.ROWWISE, False)].gemm_class is GemmClass.ROWWISE


def test_quantized_tensor_slices_and_transpose():
    x = torch.randn(256, 384)
    q = quantize(x, E4M3, Granularity.block(128))
    assert torch.equal(q.rows(128, 128).dequantize(), q.dequantize()[128:256])
    tiles = quantize(x, E4M3, Granularity.tile(128))
    assert torch.equal(tiles.cols(128, 256).dequantize(), tiles.dequantize()[:, 128:384])
    assert isinstance(q.t(), QuantizedTensor) and q.t().shape == (384, 256)
    assert math.isclose(float((q.dequantize() - x).norm() / x.norm()), 0.0, abs_tol=0.05)
