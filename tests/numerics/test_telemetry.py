"""FP8 telemetry: off by default; per layer and role amax, scale, saturated fraction (values the cast
clipped) and underflow fraction (nonzero values flushed to zero), exact on constructed tensors."""

import torch
from torch import nn

from fp8train.numerics import FP8Linear, fp8_telemetry, load_recipe, set_fp8_telemetry
from fp8train.numerics.role_caster import RoleCaster
from fp8train.numerics.recipe import RoleConfig
from tests.numerics.helpers import f32

STATS = ("amax", "scale", "saturated", "underflow", "sqnr_db")


def model(recipe_name: str = "current") -> nn.Module:
    recipe = load_recipe(recipe_name)
    return nn.Sequential(FP8Linear(128, 256, recipe=recipe, backend="emulated"), nn.ReLU(),
                         FP8Linear(256, 128, recipe=recipe, backend="emulated"))


def step(m: nn.Module) -> None:
    m(torch.randn(128, 128)).sum().backward()


def test_off_by_default_and_cleared_when_turned_off():
    m = model()
    step(m)
    assert fp8_telemetry(m) == {}
    set_fp8_telemetry(m, True)
    step(m)
    assert fp8_telemetry(m)
    set_fp8_telemetry(m, False)
    assert fp8_telemetry(m) == {}


def test_keys_per_layer_and_role():
    for name in ("hybrid", "current", "rowwise", "blockwise"):
        m = model(name)
        set_fp8_telemetry(m, True)
        step(m)
        expected = {f"fp8/{layer}/{role}/{stat}" for layer in ("0", "2")
                    for role in ("input", "weight", "grad_output") for stat in STATS}
        stats = fp8_telemetry(m)
        assert set(stats) == expected, name
        assert all(isinstance(v, float) for v in stats.values())


def test_amax_and_scale_values_for_delayed_recipe():
    m = model("hybrid")
    set_fp8_telemetry(m, True)
    x = torch.randn(128, 128) * 3
    m(x).sum().backward()
    stats = fp8_telemetry(m)
    assert stats["fp8/0/input/amax"] == x.abs().max().item()
    assert stats["fp8/0/input/scale"] == m[0].input_caster.scale.item() == 1.0
    assert stats["fp8/2/weight/amax"] == m[2].weight.abs().max().item()


def delayed_caster(fmt: str, scale: float) -> RoleCaster:
    caster = RoleCaster("input", RoleConfig(format=fmt, scaling="delayed", history_len=2))
    caster.scale.fill_(scale)
    caster.collect_telemetry = True
    return caster


def constructed(values: list[float], total: int = 64) -> torch.Tensor:
    """[4, 16]: `values` followed by ordinary in-range values (0.5) up to `total` elements."""
    return torch.tensor(values + [0.5] * (total - len(values))).reshape(4, total // 4)


def test_saturated_fraction_exact_e4m3():
    # scale 2: x * 2 is clipped beyond 448 + 16 (half an ulp): |x| > 232
    x = constructed([233.0, -240.0, 1e4, float("inf"), 232.0, -231.0, 224.0, 100.0])
    caster = delayed_caster("e4m3", 2.0)
    rows, _ = caster.cast(x, need_cols=False)
    assert caster.last_stats["saturated"] == 4 / 64
    assert rows.data.flatten()[:5].float().abs().eq(448.0).all()


def test_saturated_fraction_exact_e5m2_and_zero_without_clipping():
    caster = delayed_caster("e5m2", 1.0)
    caster.cast(constructed([61441.0, -70000.0, 61439.0, 57344.0, -57344.0]), need_cols=False)
    assert caster.last_stats["saturated"] == 2 / 64
    caster.cast(constructed([57344.0, -57344.0, 1.0]), need_cols=False)
    assert caster.last_stats["saturated"] == 0.0


def test_underflow_fraction_exact_counts_nonzero_values_only():
    # E4M3 at scale 1: the smallest subnormal is 2^-9; anything up to 2^-10 (a tie, to even) flushes
    x = constructed([1e-4, -3e-4, 2.0 ** -10, 2.0 ** -10 * 1.01, 2.0 ** -9, 0.0, 0.0, -0.0, 0.0])
    caster = delayed_caster("e4m3", 1.0)
    rows, _ = caster.cast(x, need_cols=False)
    assert caster.last_stats["underflow"] == f32(3 / 60)  # the 4 zeros do not count (FP32 ratio)
    assert rows.data.flatten()[3].float() == 2.0 ** -9


def test_online_scaling_reports_no_saturation_although_group_maxima_hit_max():
    # each 1x128 tile's largest value maps onto 448: that is not clipping
    for name in ("current", "rowwise", "blockwise"):
        m = model(name)
        set_fp8_telemetry(m, True)
        step(m)
        assert all(v == 0.0 for k, v in fp8_telemetry(m).items() if k.endswith("saturated")), name


def test_sqnr_db_against_a_float64_reference():
    """sqnr_db is 20 log10(||x|| / ||x - x_fp8||) of the cast actually made; inf for exact casts."""
    from tests.numerics.helpers import sqnr

    torch.manual_seed(0)
    for name, dtype, fmax in (("current", torch.float8_e4m3fn, 448.0), ("v3_fp8", torch.float8_e5m2, 57344.0)):
        m = model(name)
        set_fp8_telemetry(m, True)
        x = torch.randn(128, 128)
        m(x).sum().backward()  # v3_fp8: delayed, first step: scale 1
        scale = torch.tensor(1.0 if name == "v3_fp8" else f32(fmax / x.abs().max().item()))
        ref = sqnr(x, (x * scale).clamp(-fmax, fmax).to(dtype).float() / scale)
        assert abs(fp8_telemetry(m)["fp8/0/input/sqnr_db"] - ref) < 1e-6, name
    m = model("current")
    set_fp8_telemetry(m, True)
    m(torch.full((128, 128), 2.0)).sum().backward()  # powers of two: exact in FP8
    assert fp8_telemetry(m)["fp8/0/input/sqnr_db"] == float("inf")
