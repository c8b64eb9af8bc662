"""Tensorwise kernels (cast_with_amax, current_cast) against the torch reference, bit for bit."""

import math

import pytest
import torch

import kernels
from fp8train.quant.formats import FLT_MAX
from kernels import fallback as reference
from tests.kernels._helpers import assert_f32_equal, assert_fp8_equal, fp8_max, special_input

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # interpreter: numpy inf/NaN
FP8 = [torch.float8_e4m3fn, torch.float8_e5m2]
HP = [torch.bfloat16, torch.float16, torch.float32]


def test_kernels_run_triton(device):
    """Guard: without this the comparisons below could silently compare the reference to itself."""
    name, reason = kernels.kernel_backend(torch.zeros(1, device=device))
    assert name.startswith("triton"), reason


@pytest.mark.parametrize("fp8_dtype", FP8)
@pytest.mark.parametrize("hp_dtype", HP)
@pytest.mark.parametrize("shape", [(256, 384), (96, 200)])
def test_cast_with_amax_matches_reference(device, fp8_dtype, hp_dtype, shape):
    x = special_input(*shape, hp_dtype, seed=1)
    scale = torch.tensor([3.7], dtype=torch.float32)
    q, q_t, amax = kernels.cast_with_amax(x.to(device), scale.to(device), fp8_dtype, with_transpose=True)
    q_ref, q_t_ref, amax_ref = reference.cast_with_amax(x, scale, fp8_dtype, with_transpose=True)
    assert_fp8_equal(q, q_ref, "x_fp8")
    assert_fp8_equal(q_t, q_t_ref, "x_fp8_t")
    assert q_t.is_contiguous()
    assert_f32_equal(amax, amax_ref, "amax")


@pytest.mark.parametrize("fp8_dtype", FP8)
@pytest.mark.parametrize("shape, nan", [((256, 384), False), ((96, 200), False), ((128, 256), True)])
def test_cast_with_amax_tiles_leaves_one_amax_per_tile(device, fp8_dtype, shape, nan):
    """The tile variant: the same codes, and int32 bits per CAST_TILE tile whose max is the amax
    (NaN above everything); each entry is its own tile's amax, so no buffer needs zeroing."""
    from fp8train.quant.casts import amax_of_tiles

    x = special_input(*shape, torch.bfloat16, seed=3)
    if nan:
        x[100, 17] = float("nan")
    scale = torch.tensor([3.7], dtype=torch.float32)
    q, q_t, tiles = kernels.cast_with_amax_tiles(x.to(device), scale.to(device), fp8_dtype, with_transpose=True)
    q_ref, q_t_ref, amax_ref = reference.cast_with_amax(x, scale, fp8_dtype, with_transpose=True)
    assert_fp8_equal(q, q_ref, "x_fp8")
    assert_fp8_equal(q_t, q_t_ref, "x_fp8_t")
    assert tiles.dtype == torch.int32 and tiles.numel() == reference.amax_tile_count(*shape)
    assert_f32_equal(amax_of_tiles(tiles.cpu()), amax_ref, "amax")
    tm, tk = reference.CAST_TILE
    per_tile = x.float().abs().unflatten(0, (-1, tm)) if shape[0] % tm == 0 else None
    if per_tile is not None and shape[1] % tk == 0:  # every entry is its tile's own amax
        own = per_tile.unflatten(2, (-1, tk)).amax(dim=(1, 3)).flatten()
        assert torch.equal(tiles.cpu(), reference.amax_bits(own))
    assert torch.equal(amax_of_tiles(reference.cast_with_amax_tiles(x, scale, fp8_dtype)[2]).isnan(),
                       amax_ref.isnan())


@pytest.mark.parametrize("fp8_dtype", FP8)
def test_cast_with_amax_without_transpose_and_saturation(device, fp8_dtype):
    fmax = fp8_max(fp8_dtype)
    x = torch.tensor([[fmax, -fmax, 2 * fmax, -1e30, 0.5, -0.0]], dtype=torch.float32)
    q, q_t, amax = kernels.cast_with_amax(x.to(device), torch.ones(1, device=device), fp8_dtype)
    assert q_t is None
    max_code = 0x7E if fp8_dtype == torch.float8_e4m3fn else 0x7B
    half = 0x30 if fp8_dtype == torch.float8_e4m3fn else 0x38
    expected = [max_code, 0x80 | max_code, max_code, 0x80 | max_code, half, 0x80]
    assert q.cpu().view(torch.uint8)[0].tolist() == expected
    assert_f32_equal(amax, torch.tensor([1e30]))


@pytest.mark.parametrize("fp8_dtype", FP8)
def test_cast_with_amax_nan(device, fp8_dtype):
    x = special_input(128, 256, torch.bfloat16, seed=2)
    x[100, 17] = float("nan")
    scale = torch.tensor([0.25])
    q, _, amax = kernels.cast_with_amax(x.to(device), scale.to(device), fp8_dtype)
    q_ref, _, amax_ref = reference.cast_with_amax(x, scale, fp8_dtype)
    assert torch.isnan(amax).all(), "a NaN input must give a NaN amax"
    assert torch.isnan(q[100, 17].float()), "NaN must stay NaN through the saturating cast"
    assert_fp8_equal(q, q_ref)
    assert_f32_equal(amax, amax_ref)


@pytest.mark.parametrize("fp8_dtype", FP8)
@pytest.mark.parametrize("hp_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("power_of_2", [False, True])
@pytest.mark.parametrize("with_transpose", [False, True])
def test_current_cast_matches_reference(device, fp8_dtype, hp_dtype, power_of_2, with_transpose):
    x = special_input(256, 384, hp_dtype, seed=3, spread=0.01)
    x[2, :7] = 0.0  # keep amax moderate so the scale is not 1 ...
    x[5, 5] = 7.3e-3 * 11  # ... and not a power of two
    q, q_t, scale_inv = kernels.current_cast(x.to(device), fp8_dtype, power_of_2, with_transpose)
    q_ref, q_t_ref, scale_inv_ref = reference.current_cast(x, fp8_dtype, power_of_2, with_transpose)
    assert_fp8_equal(q, q_ref)
    assert (q_t is None) == (not with_transpose)
    if with_transpose:
        assert_fp8_equal(q_t, q_t_ref, "x_fp8_t")
    assert_f32_equal(scale_inv, scale_inv_ref, "scale_inv")
    assert scale_inv.item() != 1.0
    if power_of_2:
        assert math.frexp(scale_inv.item())[0] == 0.5


@pytest.mark.parametrize("fill, expected_scale", [
    (0.0, 1.0),  # amax 0 -> scale 1
    (float("inf"), 1.0),  # amax inf -> scale 1
    (float("nan"), 1.0),  # amax NaN -> scale 1
    (1e-39, FLT_MAX),  # fmax / subnormal amax overflows -> FLT_MAX
])
def test_current_cast_special_amax(device, fill, expected_scale):
    x = torch.zeros(64, 136, dtype=torch.float32)
    x[7, 9] = fill
    q, _, scale_inv = kernels.current_cast(x.to(device), torch.float8_e4m3fn)
    q_ref, _, scale_inv_ref = reference.current_cast(x, torch.float8_e4m3fn)
    assert_f32_equal(scale_inv, torch.div(torch.ones(1), torch.tensor([expected_scale])))
    assert_f32_equal(scale_inv, scale_inv_ref)
    assert_fp8_equal(q, q_ref)


def _fp8_boundaries(fp8_dtype: torch.dtype) -> torch.Tensor:
    """Every FP8 value, the fp32 midpoints between neighbours (ties) and one fp32 ulp either side."""
    values = torch.arange(256, dtype=torch.uint8).view(fp8_dtype).float()
    values = values[torch.isfinite(values) & (values >= 0)].unique()
    mids = (values[:-1].double() + values[1:].double()).div(2).float()  # exact in fp32
    ulp_up = torch.nextafter(mids, torch.tensor(float("inf")))
    ulp_down = torch.nextafter(mids, torch.tensor(0.0))
    pos = torch.cat([values, mids, ulp_up, ulp_down, torch.nextafter(values, torch.tensor(0.0))])
    return torch.cat([pos, -pos])


@pytest.mark.parametrize("fp8_dtype", FP8)
def test_rounding_every_bf16_and_every_fp8_tie(device, fp8_dtype):
    """All 65536 bf16 patterns, and fp32 values at and around every rounding tie, scale 1."""
    every_bf16 = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    ties = _fp8_boundaries(fp8_dtype)
    for x in (every_bf16.reshape(256, 256), ties.reshape(1, -1)):
        one = torch.ones(1)
        q, _, _ = kernels.cast_with_amax(x.to(device), one.to(device), fp8_dtype)
        q_ref, _, _ = reference.cast_with_amax(x, one, fp8_dtype)
        assert_fp8_equal(q, q_ref)


def test_reference_scale_against_float64():
    """The reference current scale equals fmax / amax computed in float64, rounded once to fp32."""
    g = torch.Generator().manual_seed(4)
    for _ in range(200):
        x = torch.randn(8, 16, generator=g, dtype=torch.float64) * 10.0 ** torch.randint(-45, 30, (1,), generator=g).item()
        x32 = x.float()
        amax64 = x32.double().abs().max().item()
        scale64 = min(448.0 / amax64, FLT_MAX) if 0 < amax64 < math.inf else 1.0
        _, _, scale_inv = reference.current_cast(x32, torch.float8_e4m3fn)
        expected_scale = torch.tensor([scale64], dtype=torch.float64).float()
        expected_inv = (1.0 / expected_scale.double()).float()
        assert_f32_equal(scale_inv, expected_inv)


@pytest.mark.parametrize("bad, match", [
    (torch.zeros(2, 3, 4), "2-D"),
    (torch.zeros(4, 4, dtype=torch.int32), "dtype"),
    (torch.zeros(8, 4).t(), "contiguous"),
])
def test_input_validation(bad, match):
    with pytest.raises(ValueError, match=match):
        kernels.current_cast(bad, torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="fp8_dtype"):
        kernels.current_cast(torch.zeros(4, 4), torch.bfloat16)
    with pytest.raises(ValueError, match="scale"):
        kernels.cast_with_amax(torch.zeros(4, 4), torch.ones(2), torch.float8_e4m3fn)


@pytest.mark.gpu
@pytest.mark.parametrize("fp8_dtype", FP8)
def test_large_shapes_on_gpu(fp8_dtype):
    x = special_input(4096, 3072, torch.bfloat16, seed=5).cuda()
    scale = torch.tensor([2.5], device="cuda")
    for got, want in zip(kernels.cast_with_amax(x, scale, fp8_dtype, True),
                         reference.cast_with_amax(x, scale, fp8_dtype, True)):
        (assert_fp8_equal if want.dtype == fp8_dtype else assert_f32_equal)(got, want)
    for got, want in zip(kernels.current_cast(x, fp8_dtype, False, True),
                         reference.current_cast(x, fp8_dtype, False, True)):
        (assert_fp8_equal if want.dtype == fp8_dtype else assert_f32_equal)(got, want)


@pytest.mark.parametrize("fp8_dtype", FP8)
@pytest.mark.parametrize("hp_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("with_transpose", [False, True])
@pytest.mark.parametrize("slot_before", [0.0, 1e-3, 1e9])
def test_delayed_cast_accumulates_into_history_slot(device, fp8_dtype, hp_dtype, with_transpose, slot_before):
    """The one-launch cast writes max(slot, amax) into the slot in place and returns 1/scale."""
    x = special_input(192, 256, hp_dtype, seed=4)
    scale = torch.tensor([3.7], dtype=torch.float32)
    history = torch.tensor([slot_before, 5.0, 6.0], device=device)
    history_ref = history.cpu().clone()
    q, q_t, scale_inv = kernels.delayed_cast(x.to(device), scale.to(device), history[0:1], fp8_dtype,
                                             with_transpose)
    q_ref, q_t_ref, scale_inv_ref = reference.delayed_cast(x, scale, history_ref[0:1], fp8_dtype, with_transpose)
    assert_fp8_equal(q, q_ref)
    assert (q_t is None) == (not with_transpose)
    if with_transpose:
        assert_fp8_equal(q_t, q_t_ref, "x_fp8_t")
    assert_f32_equal(scale_inv, scale_inv_ref, "scale_inv")
    assert_f32_equal(history, history_ref, "history")
    amax = x.float().abs().amax()
    assert history[0].item() == max(slot_before, amax.item()), "slot must hold max(before, amax)"
    assert history[1:].tolist() == [5.0, 6.0], "only slot 0 is written"


@pytest.mark.parametrize("fp8_dtype", FP8)
def test_delayed_cast_nan_wins_and_none_records_nothing(device, fp8_dtype):
    x = special_input(128, 128, torch.bfloat16, seed=5)
    scale = torch.tensor([0.5], device=device)
    history = torch.tensor([7.0, 1.0], device=device)
    kernels.delayed_cast(x.to(device), scale, None, fp8_dtype)  # eval: nothing recorded
    assert history.tolist() == [7.0, 1.0]
    x[3, 3] = float("nan")
    kernels.delayed_cast(x.to(device), scale, history[0:1], fp8_dtype)
    assert torch.isnan(history[0]), "a NaN input must make the slot NaN (the update keeps the old scale)"
    kernels.delayed_cast(torch.ones(128, 128, device=device), scale, history[0:1], fp8_dtype)
    assert torch.isnan(history[0]), "a later finite amax must not overwrite the NaN"


def test_delayed_cast_rejects_a_bad_slot(device):
    x = torch.ones(16, 16, device=device)
    with pytest.raises(ValueError, match="amax_slot must be a float32 \\[1\\]"):
        kernels.delayed_cast(x, torch.ones(1, device=device), torch.zeros(2, device=device), torch.float8_e4m3fn)
