"""Scale selection: the current-scaling rule, power-of-2 scales, amax (NaN, percentile) and the
delayed-scaling update, step by step against the pure-Python reference in helpers.py, both as a
batched function and through real FP8Linear modules with after_optimizer_step."""

import math
import random

import pytest
import torch

from fp8train.numerics import FP8Linear, after_optimizer_step, fp8_telemetry, set_fp8_telemetry
from fp8train.quant.reference import saturating_cast
from fp8train.quant.scaling import (count_nonfinite_current_amax, delayed_scale_update, round_down_to_power_of_2,
                                    scale_from_amax, tensor_amax)
from tests.numerics.helpers import (FLT_MAX, DelayedScalingRef, assert_exact, delayed_role, f32, make_recipe, nan_max,
                                   ref_current_scale)

FP8_MAXES = [448.0, 57344.0]
SPECIAL_AMAXES = [0.0, math.inf, -math.inf, math.nan, 1e-45, 1e-40, 1.17e-38, FLT_MAX, 1.0, 448.0]


def random_amaxes(n: int) -> list[float]:
    """FP32 amaxes log-uniform over the whole normal range, plus the special values."""
    values = torch.exp2(torch.empty(n).uniform_(-140, 127)).tolist()
    return [f32(v) for v in values] + SPECIAL_AMAXES


@pytest.mark.parametrize("power_of_2", [False, True])
@pytest.mark.parametrize("fp8_max", FP8_MAXES)
def test_scale_from_amax_matches_float64_reference(fp8_max, power_of_2):
    amaxes = random_amaxes(20_000)
    actual = scale_from_amax(torch.tensor(amaxes), fp8_max, power_of_2)
    assert_exact(actual, [ref_current_scale(a, fp8_max, power_of_2) for a in amaxes])


@pytest.mark.parametrize("amax, expected", [(0.0, 1.0), (math.inf, 1.0), (math.nan, 1.0),
                                            (1e-45, FLT_MAX), (2.0, 224.0), (448.0, 1.0)])
def test_scale_from_amax_special_cases(amax, expected):
    assert scale_from_amax(torch.tensor(amax), 448.0).item() == expected


def test_power_of_2_scale_is_exact_power_of_two_at_most_scale_and_above_half():
    scale = torch.exp2(torch.empty(50_000).uniform_(-120, 127))
    scale = torch.cat([scale, torch.tensor([1.0, 2.0, 0.75, FLT_MAX])])
    p2 = round_down_to_power_of_2(scale).double()
    mantissa, _ = torch.frexp(p2)
    assert (mantissa == 0.5).all()
    assert (p2 <= scale.double()).all() and (p2 > scale.double() / 2).all()
    assert round_down_to_power_of_2(torch.tensor([0.75, 2.0, FLT_MAX])).tolist() == [0.5, 2.0, 2.0 ** 127]


def test_tensor_amax_is_max_abs_and_propagates_nan():
    x = torch.randn(1000)
    x[17] = -9.5
    assert tensor_amax(x).item() == 9.5
    x[3] = float("nan")
    assert torch.isnan(tensor_amax(x))
    assert torch.isnan(tensor_amax(x, percentile=50.0))
    assert tensor_amax(torch.tensor([1.0, -math.inf])).item() == math.inf


@pytest.mark.parametrize("percentile", [0.01, 10.0, 50.0, 99.0, 99.9, 100.0])
def test_tensor_amax_percentile_is_kth_smallest_abs_value(percentile):
    x = torch.randn(3, 1001)
    ordered = sorted(abs(v) for v in x.flatten().tolist())
    k = max(1, min(len(ordered), round(percentile / 100 * len(ordered))))
    assert tensor_amax(x, percentile).item() == f32(ordered[k - 1])


def amax_event(rng: random.Random) -> float:
    """A recorded amax: usually a normal FP32 value, sometimes 0, inf, NaN or a subnormal."""
    kind = rng.random()
    if kind < 0.08:
        return 0.0
    if kind < 0.12:
        return math.inf
    if kind < 0.16:
        return math.nan
    if kind < 0.20:
        return f32(rng.choice([1e-42, 1e-39, 3e38]))
    return f32(math.exp2(rng.uniform(-20, 20)))


@pytest.mark.parametrize("history_len", [1, 3, 16])
@pytest.mark.parametrize("algo", ["max", "most_recent"])
@pytest.mark.parametrize("margin", [0.0, 1.0, 0.5])
def test_delayed_update_matches_python_reference_step_by_step(history_len, algo, margin):
    rng = random.Random(f"{history_len}-{algo}-{margin}")
    fp8_maxes = [448.0, 57344.0, 448.0, 57344.0, 448.0]
    refs = [DelayedScalingRef(m, history_len, algo, margin) for m in fp8_maxes]
    history = torch.zeros(len(refs), history_len)
    scale, fp8_max = torch.ones(len(refs)), torch.tensor(fp8_maxes)
    for _ in range(30):
        for row, ref in enumerate(refs):
            for _ in range(rng.choice([1, 2])):  # 1 or 2 micro-batches record into slot 0
                amax = amax_event(rng)
                ref.record(amax)
                history[row, 0] = torch.maximum(history[row, 0], torch.tensor(amax))
        history, scale, scale_inv = delayed_scale_update(history, scale, fp8_max, margin, algo)
        for ref in refs:
            ref.update()
        assert_exact(history, [ref.history for ref in refs])
        assert_exact(scale, [ref.scale for ref in refs])
        assert_exact(scale_inv, [ref.scale_inv for ref in refs])


def test_delayed_update_does_not_modify_its_inputs():
    history, scale = torch.tensor([[3.0, 5.0, 7.0]]), torch.tensor([2.0])
    delayed_scale_update(history, scale, torch.tensor([448.0]), 0.0, "max")
    assert history.tolist() == [[3.0, 5.0, 7.0]] and scale.tolist() == [2.0]


def test_delayed_update_rejects_unknown_algo():
    with pytest.raises(ValueError, match="'mean'"):
        delayed_scale_update(torch.zeros(1, 2), torch.ones(1), torch.tensor([448.0]), 0.0, "mean")


# ---------------------------------------------------------------- through real FP8Linear modules
MODULE_RECIPE = dict(input=delayed_role("e4m3", 4, "max", 0.0),
                     weight=delayed_role("e4m3", 3, "most_recent", 1.0),
                     grad_output=delayed_role("e5m2", 5, "max", 0.5))
INPUT_FACTORS = [1.0, 3.0, 0.0, 200.0, 0.01, "inf", 1.0, 50.0, 0.5, 2.0, 1e-3, 7.0]
GRAD_FACTORS = [1.0, 1e-4, 1.0, "nan", 10.0, 0.0, 1e3, 1.0, 0.2, 5.0, 1.0, 30.0]


def scaled(shape, factor) -> torch.Tensor:
    t = torch.randn(shape)
    if factor in ("inf", "nan"):
        t[0, 0] = float(factor)
        return t
    return t * factor


def test_delayed_scaling_through_fp8linear_matches_reference():
    recipe = make_recipe(**MODULE_RECIPE)
    layers = torch.nn.ModuleList([FP8Linear(32, 16, recipe=recipe), FP8Linear(16, 48, recipe=recipe)])
    refs = {(i, role): DelayedScalingRef(getattr(recipe, role).fp8.max, getattr(recipe, role).history_len,
                                         getattr(recipe, role).amax_compute_algo, getattr(recipe, role).margin)
            for i in range(2) for role in ("input", "weight", "grad_output")}
    for step, (fx, fg) in enumerate(zip(INPUT_FACTORS, GRAD_FACTORS)):
        for i, layer in enumerate(layers):
            refs[i, "weight"].record(layer.weight.detach().abs().max().item())
            for _ in range(2):  # two micro-batches per optimizer step
                x, dy = scaled((24, layer.in_features), fx), scaled((24, layer.out_features), fg)
                layer(x).backward(dy)
                refs[i, "input"].record(tensor_amax(x).item())
                refs[i, "grad_output"].record(tensor_amax(dy).item())
        with torch.no_grad():
            for p in layers.parameters():
                if torch.isfinite(p.grad).all():
                    p -= 0.05 * p.grad
                p.grad = None
        after_optimizer_step(layers)
        for (i, role), ref in refs.items():
            ref.update()
            caster = getattr(layers[i], f"{role}_caster")
            assert_exact(caster.amax_history, ref.history)
            assert_exact(caster.scale, ref.scale)
            assert_exact(caster.scale_inv, ref.scale_inv)
    assert all(layer.weight_casts == len(INPUT_FACTORS) for layer in layers)


def test_delayed_cast_uses_history_scale_and_records_amax_in_same_pass():
    recipe = make_recipe(input=delayed_role("e4m3", 8), weight=delayed_role("e4m3", 8),
                         grad_output=delayed_role("e5m2", 8))
    layer = FP8Linear(64, 32, bias=False, recipe=recipe)
    layer.input_caster.scale.fill_(8.0)  # as if earlier steps had set it
    layer.weight_caster.scale.fill_(64.0)
    x = torch.randn(40, 64) * 100  # x * 8 exceeds 448: some values saturate
    y = layer(x)
    assert layer.input_caster.amax_history[0].item() == x.abs().max().item()
    assert layer.input_caster.amax_history[1:].eq(0).all()
    assert layer.weight_caster.amax_history[0].item() == layer.weight.abs().max().item()
    x_fp8 = saturating_cast(x * 8.0, layer.input_caster.fmt)
    w_fp8 = saturating_cast(layer.weight.detach() * 64.0, layer.weight_caster.fmt)
    assert (x * 8.0).abs().max() > 448 and x_fp8.float().abs().max() == 448
    expected = (x_fp8.float() * (1 / 8.0)) @ (w_fp8.float() * (1 / 64.0)).t()
    assert torch.equal(y, expected)
    rows, _ = layer.input_caster.cast(x, need_cols=False)
    assert torch.equal(rows.data.view(torch.uint8), x_fp8.view(torch.uint8))
    assert layer.input_caster.scale.item() == 8.0  # the cast never moves the scale by itself


def test_non_finite_amaxes_are_skipped_not_frozen_for_the_whole_history():
    """Issue #13 item 7: one NaN/inf step must not freeze the scale for history_len updates (TE's
    PyTorch fallback does that; its CUDA kernel skips NaN, as we do)."""
    assert math.isnan(nan_max(3.0, math.nan))  # recording still propagates NaN into slot 0
    history = torch.tensor([[math.nan, 2.0, 4.0], [math.inf, 2.0, 4.0], [math.nan, math.inf, 0.0]])
    scale, fmax = torch.tensor([5.0, 5.0, 5.0]), torch.tensor([448.0, 448.0, 448.0])
    _, new_scale, _ = delayed_scale_update(history, scale, fmax, 0.0, "max")
    assert new_scale.tolist() == [112.0, 112.0, 5.0]  # 448 / 4 from the finite entries; none finite: kept
    _, new_scale, _ = delayed_scale_update(history, scale, fmax, 0.0, "most_recent")
    assert new_scale.tolist() == [5.0, 5.0, 5.0]  # slot 0 is the only amax: keep the old scale
    assert count_nonfinite_current_amax(history).item() == 3


def test_stored_infinite_scale_is_capped_to_flt_max_like_the_kernel_and_te():
    """Issue #13 item 6: with no valid amax the old scale is kept, but an infinite one becomes FLT_MAX
    (scale_inv stays a finite, nonzero number), bit-identical to kernels/delayed.py."""
    _, new_scale, new_inv = delayed_scale_update(torch.zeros(1, 4), torch.tensor([math.inf]),
                                                 torch.tensor([448.0]), 0.0, "max")
    assert new_scale.item() == FLT_MAX and new_inv.item() == f32(1.0 / FLT_MAX) and new_inv.item() > 0


def test_telemetry_counts_skipped_non_finite_amaxes():
    layer = FP8Linear(32, 16, recipe=make_recipe(input=delayed_role("e4m3", 4), weight=delayed_role("e4m3", 4),
                                                 grad_output=delayed_role("e5m2", 4)))
    x = torch.randn(8, 32)
    x[0, 0] = math.nan
    layer(x).sum().backward()
    set_fp8_telemetry(layer, True)
    after_optimizer_step(layer, count_nonfinite=True)
    assert fp8_telemetry(layer)["fp8/nonfinite_amax_skipped"] == 1.0  # the NaN input (dY = 1 is finite)


def test_eval_forward_does_not_record_amax():
    """Delayed scaling learns from training steps only: an eval forward leaves the history alone."""
    from fp8train.numerics import FP8Linear, load_recipe

    layer = FP8Linear(128, 128, recipe=load_recipe("hybrid"), backend="emulated")
    layer.eval()
    with torch.no_grad():
        layer(torch.randn(16, 128))
    assert torch.count_nonzero(layer.input_caster.amax_history) == 0
    layer.train()
    layer(torch.randn(16, 128))
    assert layer.input_caster.amax_history[0] > 0
