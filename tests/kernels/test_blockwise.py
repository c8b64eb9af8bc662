"""Blockwise quantizers (1x128, 1x128 of x^T, both, 128x128) against the reference, bit for bit,
and the reference's scales against an independent float64 computation."""

import math

import pytest
import torch

import kernels
from fp8train.quant.formats import FLT_MAX
from kernels import fallback as reference
from tests.kernels._helpers import assert_f32_equal, assert_fp8_equal, fp8_max, special_input

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # interpreter: numpy inf/NaN
FP8 = [torch.float8_e4m3fn, torch.float8_e5m2]
OPS = ["quantize_1x128", "quantize_1x128_t", "quantize_1x128_both", "quantize_128x128", "quantize_128x128_both"]
SHAPES = [(256, 384), (384, 256), (512, 256)]  # M != K both ways, several tiles per dimension


def blockwise_input(m: int, k: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """special_input plus a zero 128x128 tile, a NaN, an inf, and tiles of very different range."""
    x = special_input(m, k, dtype, seed=seed)
    x[128:256, 128:256] = 0.0
    x[130, k - 1] = float("nan")
    x[200, 5] = float("inf")
    x[2, 7] = float("inf")  # its tile gets scale 1, so the 1e4 values beside it saturate
    x[8, :128] = 1e-40  # 1x128 tile whose fmax / amax overflows fp32 -> scale FLT_MAX
    x[:, k - 128:] *= 1e-3  # per-tile scales differ by orders of magnitude
    return x


def _compare(got, want, fp8_dtype):
    for i, (g, w) in enumerate(zip(got, want)):
        (assert_fp8_equal if w.dtype == fp8_dtype else assert_f32_equal)(g, w, f"output {i}")


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("fp8_dtype", FP8)
@pytest.mark.parametrize("power_of_2", [False, True])
def test_matches_reference(device, op, fp8_dtype, power_of_2):
    x = blockwise_input(256, 384, torch.bfloat16, seed=10)
    got = getattr(kernels, op)(x.to(device), fp8_dtype, power_of_2)
    _compare(got, getattr(reference, op)(x, fp8_dtype, power_of_2), fp8_dtype)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("hp_dtype", [torch.float32, torch.float16])
def test_matches_reference_other_input_dtypes(device, op, hp_dtype):
    x = blockwise_input(256, 256, hp_dtype, seed=11)
    got = getattr(kernels, op)(x.to(device), torch.float8_e4m3fn)
    _compare(got, getattr(reference, op)(x, torch.float8_e4m3fn), torch.float8_e4m3fn)


def test_scale_layouts(device):
    x = blockwise_input(256, 384, torch.bfloat16, seed=12).to(device)
    q, s = kernels.quantize_1x128(x, torch.float8_e4m3fn)
    assert (q.shape, s.shape, s.stride()) == ((256, 384), (256, 3), (1, 256))
    q_t, s_t = kernels.quantize_1x128_t(x, torch.float8_e4m3fn)
    assert (q_t.shape, q_t.stride(), s_t.shape, s_t.stride()) == ((384, 256), (256, 1), (384, 2), (1, 384))
    q_w, s_w = kernels.quantize_128x128(x, torch.float8_e4m3fn)
    assert (q_w.shape, s_w.shape, s_w.is_contiguous()) == ((256, 384), (2, 3), True)
    zero_tile = s_w[1, 1].item()
    assert zero_tile == 1.0, "a zero 128x128 block gets scale 1"


def test_both_equals_separate_calls(device):
    x = blockwise_input(256, 384, torch.bfloat16, seed=13).to(device)
    q, s, q_t, s_t = kernels.quantize_1x128_both(x, torch.float8_e5m2, True)
    _compare((q, s), kernels.quantize_1x128(x, torch.float8_e5m2, True), torch.float8_e5m2)
    _compare((q_t, s_t), kernels.quantize_1x128_t(x, torch.float8_e5m2, True), torch.float8_e5m2)


def chunked_input(m: int, k: int, seed: int) -> torch.Tensor:
    """blockwise_input plus specials in the first and middle chunks of a tile, so that the row amax
    of `quantize_1x128_both` must combine every chunk: a NaN at column 3 and a saturating value
    (whose row tile then has a small scale) at column 70 of different rows."""
    x = blockwise_input(m, k, torch.bfloat16, seed=seed)
    x[131, 3] = float("nan")
    x[140, 70] = 1e30
    x[141, 127] = -3e38
    return x


@pytest.mark.parametrize("chunk", [32, 64, 128])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("fp8_dtype", FP8)
@pytest.mark.parametrize("power_of_2", [False, True])
def test_1x128_both_every_chunk_matches_reference(monkeypatch, device, chunk, shape, fp8_dtype, power_of_2):
    from kernels import blockwise

    monkeypatch.setitem(blockwise.TILES, "both", {"chunk": chunk, "num_warps": 4})
    x = chunked_input(*shape, seed=20)
    got = kernels.quantize_1x128_both(x.to(device), fp8_dtype, power_of_2)
    _compare(got, reference.quantize_1x128_both(x, fp8_dtype, power_of_2), fp8_dtype)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("fp8_dtype", FP8)
@pytest.mark.parametrize("power_of_2", [False, True])
def test_128x128_both_matches_reference(device, shape, fp8_dtype, power_of_2):
    x = chunked_input(*shape, seed=21)
    got = kernels.quantize_128x128_both(x.to(device), fp8_dtype, power_of_2)
    _compare(got, reference.quantize_128x128_both(x, fp8_dtype, power_of_2), fp8_dtype)


def test_128x128_both_layouts_and_transpose(device):
    """q_t and scale_inv_t are contiguous transposes of q and scale_inv (same bytes, same scales)."""
    x = blockwise_input(256, 384, torch.float32, seed=22).to(device)
    q, s, q_t, s_t = kernels.quantize_128x128_both(x, torch.float8_e4m3fn)
    assert (q_t.shape, q_t.is_contiguous(), s_t.shape, s_t.is_contiguous()) == ((384, 256), True, (3, 2), True)
    assert_fp8_equal(q_t, q.t().contiguous(), "q_t")
    assert_f32_equal(s_t, s.t().contiguous(), "scale_inv_t")
    _compare((q, s), kernels.quantize_128x128(x, torch.float8_e4m3fn), torch.float8_e4m3fn)


def test_untiled_dimension_may_be_ragged(device):
    """1x128 tiles only constrain K; 1x128 of x^T only constrains M (masks cover the rest)."""
    x = blockwise_input(256, 384, torch.bfloat16, seed=14)
    rows = x[:200].contiguous()
    _compare(kernels.quantize_1x128(rows.to(device), torch.float8_e4m3fn),
             reference.quantize_1x128(rows, torch.float8_e4m3fn), torch.float8_e4m3fn)
    cols = x[:, :200].contiguous()
    _compare(kernels.quantize_1x128_t(cols.to(device), torch.float8_e4m3fn),
             reference.quantize_1x128_t(cols, torch.float8_e4m3fn), torch.float8_e4m3fn)


@pytest.mark.parametrize("op, shape, dim", [
    ("quantize_1x128", (128, 200), "K"),
    ("quantize_1x128_t", (200, 128), "M"),
    ("quantize_1x128_both", (128, 200), "K"),
    ("quantize_1x128_both", (200, 128), "M"),
    ("quantize_128x128", (200, 128), "N"),
    ("quantize_128x128", (128, 200), "K"),
    ("quantize_128x128_both", (200, 128), "N"),
    ("quantize_128x128_both", (128, 200), "K"),
])
def test_ragged_tiled_dimension_raises(op, shape, dim):
    with pytest.raises(ValueError, match=f"{dim} \\(dim .\\) to be a multiple of 128, got {dim}=200"):
        getattr(kernels, op)(torch.zeros(shape), torch.float8_e4m3fn)


def _f32(v: float) -> float:
    """Round a float64 to float32 once (overflow -> inf)."""
    return torch.tensor(v, dtype=torch.float64).float().item()


def _scale_inv_f64(amax: float, fmax: float, power_of_2: bool) -> float:
    """Independent float64 model. One fp32 rounding of an exact-in-float64 quotient equals the
    correctly rounded fp32 division (53 >= 2 * 24 + 2 bits), so this must match bit for bit."""
    scale = _f32(fmax / amax) if 0 < amax < math.inf else 1.0
    scale = min(scale, FLT_MAX)
    if power_of_2:
        scale = 2.0 ** (math.frexp(scale)[1] - 1)
    return _f32(1.0 / scale)


@pytest.mark.parametrize("fp8_dtype", FP8)
@pytest.mark.parametrize("power_of_2", [False, True])
def test_reference_scales_against_float64(fp8_dtype, power_of_2):
    g = torch.Generator().manual_seed(15)
    x = torch.randn(256, 256, generator=g) * 10.0 ** torch.randint(-44, 30, (256, 1), generator=g)
    x[0:128, 0:128] = 0.0
    x[5, 5] = float("nan")
    x[6, 200] = float("inf")
    x[7, :128] = 1e-40  # fmax / amax overflows -> FLT_MAX
    fmax = fp8_max(fp8_dtype)
    x64 = x.double()
    _, s_rows = reference.quantize_1x128(x, fp8_dtype, power_of_2)
    _, s_cols = reference.quantize_1x128_t(x, fp8_dtype, power_of_2)
    _, s_blocks = reference.quantize_128x128(x, fp8_dtype, power_of_2)
    for m in range(256):
        for t in range(2):
            tile = x64[m, 128 * t:128 * (t + 1)].abs()
            amax = math.nan if tile.isnan().any() else tile.max().item()
            assert s_rows[m, t].item() == _scale_inv_f64(amax, fmax, power_of_2), (m, t)
            col = x64[128 * t:128 * (t + 1), m].abs()
            amax = math.nan if col.isnan().any() else col.max().item()
            assert s_cols[m, t].item() == _scale_inv_f64(amax, fmax, power_of_2), (m, t)
    for i in range(2):
        for j in range(2):
            block = x64[128 * i:128 * (i + 1), 128 * j:128 * (j + 1)].abs()
            amax = math.nan if block.isnan().any() else block.max().item()
            assert s_blocks[i, j].item() == _scale_inv_f64(amax, fmax, power_of_2), (i, j)


def test_reference_dequantizes_within_half_ulp():
    """q * scale_inv is within half an FP8 ulp of x (relative 2^-4 for E4M3) for normal values."""
    g = torch.Generator().manual_seed(16)
    x = torch.randn(128, 256, generator=g)
    q, s = reference.quantize_1x128(x, torch.float8_e4m3fn)
    deq = q.float().view(128, 2, 128) * s.unsqueeze(-1)
    rel = ((deq.view(128, 256) - x).abs() / x.abs())[x.abs() * (1 / s).repeat_interleave(128, 1) >= 2**-6]
    assert rel.max().item() <= 2**-4


@pytest.mark.gpu
@pytest.mark.parametrize("op", OPS)
def test_large_shapes_on_gpu(op):
    x = blockwise_input(4096, 2048, torch.bfloat16, seed=17).cuda()
    for fp8_dtype in FP8:
        _compare(getattr(kernels, op)(x, fp8_dtype, False), getattr(reference, op)(x, fp8_dtype, False),
                 fp8_dtype)
