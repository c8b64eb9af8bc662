"""Rowwise, 1x128-tile, 128x1-tile and 128x128-block quantization against a float64 reference
computed group by group with explicit Python loops: FP8 bytes and FP32 scales bit for bit."""

import math

import pytest
import torch

from fp8train.quant import BLOCK, E4M3, E5M2, Granularity, GranularityKind, QuantizedTensor, quantize
from fp8train.quant.reference import quantize_with_scale
from tests.numerics.helpers import FLT_MAX, assert_exact, f32, ref_current_scale, sqnr


def quantize_tensorwise(x, fmt, scale):
    return quantize_with_scale(x, fmt, scale, Granularity.tensor())


def quantize_rowwise(x, fmt, power_of_2=False):
    return quantize(x, fmt, Granularity.row(), power_of_2=power_of_2)


def quantize_tiles(x, fmt, power_of_2=False):
    return quantize(x, fmt, Granularity.tile(BLOCK), power_of_2=power_of_2)


def quantize_blocks(x, fmt, power_of_2=False):
    return quantize(x, fmt, Granularity.block(BLOCK), power_of_2=power_of_2)

ROWS, COLS = 256, 384


def sample_matrix() -> torch.Tensor:
    """256x384 with magnitudes varying by row and column, and special 128-wide regions:
    a NaN (row 5, tile 1), an all-zero tile (row 7, tile 0), an inf (row 9, tile 2),
    a subnormal-tiny tile (row 11, tile 1)."""
    x = torch.randn(ROWS, COLS) * torch.exp2(torch.randint(-12, 12, (ROWS, 1)).float()) \
        * torch.exp2(torch.randint(-4, 4, (1, COLS)).float())
    x[5, 130] = float("nan")
    x[7, 0:128] = 0.0
    x[9, 300] = float("inf")
    x[11, 128:256] = torch.randn(128) * 1e-41
    return x


def ref_group(group: torch.Tensor, fmt, power_of_2: bool) -> tuple[torch.Tensor, float]:
    """(FP8 data, scale_inv) for one group: scale from amax in float64, product rounded once to FP32."""
    flat = group.double().flatten()
    amax = math.nan if torch.isnan(flat).any() else flat.abs().max().item()
    scale = ref_current_scale(amax, fmt.max, power_of_2)
    scaled = (group.double() * scale).float()  # exact float64 product of two FP32 numbers -> FP32
    return scaled.clamp(-fmt.max, fmt.max).to(fmt.dtype), f32(1.0 / scale)


def ref_quantize(x: torch.Tensor, fmt, power_of_2: bool, tile_rows: int, tile_cols: int):
    """Quantize x in (tile_rows x tile_cols) groups with explicit loops; returns (data, scale_inv grid)."""
    rows, cols = x.shape
    data = torch.empty(rows, cols, dtype=fmt.dtype)
    scale_inv = torch.empty(rows // tile_rows, cols // tile_cols)
    for i in range(rows // tile_rows):
        for j in range(cols // tile_cols):
            r, c = slice(i * tile_rows, (i + 1) * tile_rows), slice(j * tile_cols, (j + 1) * tile_cols)
            data[r, c], scale_inv[i, j] = ref_group(x[r, c], fmt, power_of_2)
    return data, scale_inv


def assert_matches(q: QuantizedTensor, data: torch.Tensor, scale_inv: torch.Tensor) -> None:
    assert q.data.dtype == data.dtype and q.data.is_contiguous()
    assert torch.equal(q.data.view(torch.uint8), data.view(torch.uint8))
    assert_exact(q.scale_inv, scale_inv)


FORMATS = [pytest.param(E4M3, id="e4m3"), pytest.param(E5M2, id="e5m2")]
POW2 = [pytest.param(False, id="exact"), pytest.param(True, id="pow2")]


@pytest.mark.parametrize("power_of_2", POW2)
@pytest.mark.parametrize("fmt", FORMATS)
def test_rowwise_matches_reference_row_by_row(fmt, power_of_2):
    x = sample_matrix()
    q = quantize_rowwise(x, fmt, power_of_2)
    assert q.kind is GranularityKind.ROW and q.scale_inv.shape == (ROWS, 1)
    assert_matches(q, *ref_quantize(x, fmt, power_of_2, 1, COLS))


@pytest.mark.parametrize("power_of_2", POW2)
@pytest.mark.parametrize("fmt", FORMATS)
def test_1x128_tiles_match_reference_tile_by_tile(fmt, power_of_2):
    x = sample_matrix()
    q = quantize_tiles(x, fmt, power_of_2)
    assert q.kind is GranularityKind.TILE and q.scale_inv.shape == (ROWS, COLS // BLOCK)
    assert_matches(q, *ref_quantize(x, fmt, power_of_2, 1, BLOCK))


@pytest.mark.parametrize("power_of_2", POW2)
@pytest.mark.parametrize("fmt", FORMATS)
def test_128x1_tiles_of_transpose_match_reference(fmt, power_of_2):
    x = sample_matrix()  # the token-major wgrad operand: tiles run down the columns of x
    q = quantize_tiles(x.t(), fmt, power_of_2)
    data, scale_inv = ref_quantize(x, fmt, power_of_2, BLOCK, 1)
    assert_matches(q, data.t().contiguous(), scale_inv.t().contiguous())


@pytest.mark.parametrize("power_of_2", POW2)
@pytest.mark.parametrize("fmt", FORMATS)
def test_128x128_blocks_match_reference_block_by_block(fmt, power_of_2):
    x = sample_matrix()
    q = quantize_blocks(x, fmt, power_of_2)
    assert q.kind is GranularityKind.BLOCK and q.scale_inv.shape == (ROWS // BLOCK, COLS // BLOCK)
    assert_matches(q, *ref_quantize(x, fmt, power_of_2, BLOCK, BLOCK))


def test_nan_and_zero_tiles_get_unit_scale_and_nan_stays_nan():
    x = sample_matrix()
    q = quantize_tiles(x, E4M3)
    assert q.scale_inv[5, 1] == 1.0 and q.scale_inv[7, 0] == 1.0 and q.scale_inv[9, 2] == 1.0
    assert torch.isnan(q.data[5, 130].float()) and (q.data[7, :128].float() == 0).all()
    assert q.data[9, 300].float() == 448.0  # inf saturates
    assert torch.isfinite(q.data[5, 128:256].float()).sum() == 127
    # an FP32-subnormal tile: 448 / amax overflows, the scale is capped at FLT_MAX (finite)
    assert q.scale_inv[11, 1].item() == f32(1.0 / FLT_MAX)
    assert 0 < q.data[11, 128:256].float().abs().amax() < 448.0


def test_power_of_2_scales_are_powers_of_two():
    q = quantize_blocks(sample_matrix(), E4M3, power_of_2=True)
    mantissa, _ = torch.frexp(q.scale_inv)
    assert (mantissa == 0.5).all()


def test_tensorwise_quantization_and_dequantization():
    x = torch.randn(64, 256) * 3
    q = quantize_tensorwise(x, E4M3, torch.tensor(50.0))
    assert torch.equal(q.data.view(torch.uint8), (x * 50.0).clamp(-448, 448).to(E4M3.dtype).view(torch.uint8))
    assert q.scale_inv.item() == f32(1 / 50.0)
    assert torch.equal(q.dequantize(), q.data.float() * q.scale_inv)


@pytest.mark.parametrize("quantize", [quantize_rowwise, quantize_tiles, quantize_blocks])
def test_dequantize_round_trip_sqnr(quantize):
    x = torch.randn(256, 384) * torch.exp2(torch.randint(-8, 8, (256, 1)).float())
    assert sqnr(x, quantize(x, E4M3).dequantize()) >= 25.0


def test_block_transpose_equals_quantizing_the_transpose():
    w = torch.randn(256, 384) * torch.exp2(torch.randint(-6, 6, (256, 1)).float())
    from_t = quantize_blocks(w, E4M3).t()
    direct = quantize_blocks(w.t().contiguous(), E4M3)
    assert from_t.shape == (384, 256) and from_t.kind is GranularityKind.BLOCK
    assert torch.equal(from_t.data.view(torch.uint8), direct.data.view(torch.uint8))
    assert torch.equal(from_t.scale_inv, direct.scale_inv)
    assert torch.equal(from_t.dequantize(), direct.dequantize())


def test_tensorwise_transpose_reuses_values():
    q = quantize_tensorwise(torch.randn(32, 48), E5M2, torch.tensor(4.0))
    assert torch.equal(q.t().data.view(torch.uint8), q.data.t().view(torch.uint8))


@pytest.mark.parametrize("quantize", [quantize_rowwise, quantize_tiles])
def test_row_and_tile_operands_refuse_transpose(quantize):
    with pytest.raises(ValueError, match="cannot be transposed without re-quantizing"):
        quantize(torch.randn(128, 128), E4M3).t()


def test_non_multiple_of_128_errors_name_the_dimension():
    with pytest.raises(ValueError, match="inner dimension=100 is not a multiple of 128"):
        quantize_tiles(torch.randn(4, 100), E4M3)
    with pytest.raises(ValueError, match="outer dimension=200 is not a multiple of 128"):
        quantize_blocks(torch.randn(200, 256), E4M3)
    with pytest.raises(ValueError, match="inner dimension=300 is not a multiple of 128"):
        quantize_blocks(torch.randn(256, 300), E4M3)
