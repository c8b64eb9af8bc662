"""The FP8 health guard: thresholds on telemetry, the promotion ladder (formats kept), the module
swap (same Parameters, QAT slots carried), state as data, and an injected outlier promoting a
delayed-scaling layer on CPU."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from fp8train.numerics import FP8Linear, after_optimizer_step, fp8_telemetry, load_recipe, set_fp8_telemetry
from fp8train.numerics.health_guard import (GuardDecision, GuardThresholds, HealthGuard, HighPrecisionLinear,
                                            Promotion, next_promotion, parse_telemetry, promote_layer,
                                            promoted_recipe, replay_promotions, rewind_promotions)


def model(recipe: str = "v3_fp8", out: int = 128) -> nn.Module:
    torch.manual_seed(0)
    r = load_recipe(recipe)
    return nn.Sequential(FP8Linear(128, 128, recipe=r, backend="emulated"), nn.ReLU(),
                         FP8Linear(128, out, recipe=r, backend="emulated"))


def test_ladder_keeps_the_card_formats():
    m = model("v3_fp8")
    assert next_promotion(m[0]) is Promotion.CURRENT
    current = promoted_recipe(m[0].recipe, Promotion.CURRENT)
    assert [current.role(r).scaling for r in ("input", "weight", "grad_output")] == ["current"] * 3
    assert [current.role(r).format for r in ("input", "weight", "grad_output")] == ["e5m2", "e4m3", "e4m3"]
    promote_layer(m, "0", Promotion.CURRENT)
    assert next_promotion(m[0]) is Promotion.BLOCKWISE
    blockwise = promoted_recipe(m[0].recipe, Promotion.BLOCKWISE)
    assert blockwise.padding == "zero" and blockwise.input.format == "e5m2" and blockwise.input.scaling == "blockwise"
    promote_layer(m, "0", Promotion.BLOCKWISE)
    assert next_promotion(m[0]) is Promotion.HIGH_PRECISION
    promote_layer(m, "0", Promotion.HIGH_PRECISION)
    assert isinstance(m[0], HighPrecisionLinear) and next_promotion(m[0]) is None
    assert next_promotion(model("current", out=96)[2]) is Promotion.HIGH_PRECISION  # 96: no 128-blocks


def test_percentile_clipping_survives_current_and_is_dropped_by_blockwise():
    import dataclasses

    recipe = load_recipe("v3_fp8")
    clipped = dataclasses.replace(recipe, input=dataclasses.replace(recipe.input, amax_percentile=99.9)).validate()
    current = promoted_recipe(clipped, Promotion.CURRENT)
    assert current.input.scaling == "current" and current.input.amax_percentile == 99.9
    blockwise = promoted_recipe(current, Promotion.BLOCKWISE)
    assert blockwise.input.scaling == "blockwise" and blockwise.input.amax_percentile is None
    rowwise = load_recipe("rowwise")  # a non-delayed layer keeps its scaling when promoted to current
    assert promoted_recipe(rowwise, Promotion.CURRENT).weight.scaling == "rowwise"


def test_promotion_keeps_parameters_and_the_function():
    m = model("v3_fp8")
    weight = m[0].weight
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    x = torch.randn(64, 128)
    promote_layer(m, "0", Promotion.HIGH_PRECISION)
    assert m[0].weight is weight  # the optimizer still updates it
    m(x).sum().backward()
    opt.step()
    assert not torch.equal(m[0].weight.detach(), torch.zeros_like(weight))
    expected = nn.functional.linear(x, weight, m[0].bias)
    assert torch.equal(m[0](x), expected)  # high precision: exactly the plain linear
    with pytest.raises(ValueError, match="not an FP8Linear"):
        promote_layer(m, "1", Promotion.CURRENT)


def test_thresholds_and_patience():
    m = model("v3_fp8")
    guard = HealthGuard(GuardThresholds(max_underflow=0.05, patience=2))
    bad = {"fp8/2/grad_output/underflow": 0.2, "fp8/2/grad_output/saturated": 0.0, "fp8/0/input/underflow": 0.0,
           "fp8/nonfinite_amax_skipped": 0.0}
    assert guard.observe(10, bad, m) == []  # one strike
    assert guard.observe(20, {"fp8/2/grad_output/underflow": 0.0}, m) == []  # strikes reset
    assert guard.observe(30, bad, m) == []
    (decision,) = guard.observe(40, bad, m)
    assert decision.layer == "2" and decision.promotion is Promotion.CURRENT and decision.step == 40
    assert "grad_output underflow 0.2 > 0.05" in str(decision)
    sqnr = GuardThresholds(min_sqnr_db=20.0, patience=1)
    (decision,) = HealthGuard(sqnr).observe(1, {"fp8/0/input/sqnr_db": 12.5}, m)
    assert "input sqnr_db 12.5 < 20" in str(decision)
    with pytest.raises(ValueError, match="patience=0 must be an integer >= 1"):
        GuardThresholds(patience=0)
    with pytest.raises(ValueError, match="max_underflow=2 must be a fraction"):
        GuardThresholds(max_underflow=2)


def test_amax_jump_counts_for_delayed_roles_only():
    t = GuardThresholds(max_amax_jump=8.0, patience=1)
    guard = HealthGuard(t)
    delayed, current = model("v3_fp8"), model("current")
    assert guard.observe(1, {"fp8/0/input/amax": 1.0}, delayed) == []
    (decision,) = guard.observe(2, {"fp8/0/input/amax": 100.0}, delayed)
    assert "input amax_jump 100 > 8" in str(decision)
    guard = HealthGuard(t)
    guard.observe(1, {"fp8/0/input/amax": 1.0}, current)
    assert guard.observe(2, {"fp8/0/input/amax": 100.0}, current) == []  # current scaling adapts


def run_step(m: nn.Module, x: torch.Tensor) -> dict[str, float]:
    set_fp8_telemetry(m, True)
    m(x).square().mean().backward()
    after_optimizer_step(m)
    stats = fp8_telemetry(m)
    set_fp8_telemetry(m, False)
    return stats


def test_injected_outlier_promotes_the_delayed_layer_and_state_round_trips():
    m = model("v3_fp8")
    guard = HealthGuard(GuardThresholds(max_saturated=1e-3, max_underflow=1.0, patience=1, max_amax_jump=1e9))
    x = torch.randn(64, 128)
    for _ in range(2):  # cold start (not checked): delayed scales are 1 until updated, and layer 0's
        run_step(m, x)  # gradient is zero while layer 2's is still flushed (one step per layer)
    for step in range(3, 5):  # the delayed scales have settled on x's range
        assert guard.observe(step, run_step(m, x), m) == []
    spiky = x.clone()
    spiky[:, :8] *= 1e4  # 8 outlier channels: far beyond what the history has seen
    stats = run_step(m, spiky)
    assert stats["fp8/0/input/saturated"] > 0.05  # 8 of 128 channels clipped
    (decision,) = [d for d in guard.observe(5, stats, m) if d.layer == "0"]
    assert decision.promotion is Promotion.CURRENT and "input saturated" in str(decision)
    promote_layer(m, decision.layer, decision.promotion)
    guard.record(decision)
    assert run_step(m, spiky)["fp8/0/input/saturated"] == 0.0  # current scaling: nothing clipped

    state = json.loads(json.dumps(guard.state_dict()))  # plain data
    fresh, restored = model("v3_fp8"), HealthGuard()
    restored.load_state_dict(state)
    replay_promotions(fresh, restored.promotions)
    assert fresh[0].recipe.input.scaling == "current" and fresh[2].recipe.input.scaling == "delayed"
    assert set(fresh.state_dict()) == set(m.state_dict())  # a checkpoint of m loads into fresh
    fresh.load_state_dict(m.state_dict())


def test_parse_telemetry_ignores_other_keys():
    parsed = parse_telemetry({"fp8/layers.0.attn.q_proj/input/amax": 2.0, "fp8/nonfinite_amax_skipped": 1.0,
                              "train/loss": 3.0})
    assert parsed == {"layers.0.attn.q_proj": {"input": {"amax": 2.0}}}
    assert GuardDecision(3, "a", Promotion.BLOCKWISE, ("x",)).to_dict()["promotion"] == "blockwise"


def test_rewind_undoes_promotions_made_after_a_checkpoint():
    """A rollback to a checkpoint taken after promotion A but before B and C: the structure goes
    back to 'A only', so that checkpoint's state_dict loads strictly."""
    m = model("v3_fp8")
    a = {"step": 1, "layer": "0", "promotion": "current"}
    replay_promotions(m, [a])
    checkpoint = {k: v.clone() for k, v in m.state_dict().items()}
    weight = m[0].weight
    later = [a, {"step": 2, "layer": "0", "promotion": "blockwise"}, {"step": 2, "layer": "2", "promotion": "current"}]
    replay_promotions(m, later[1:])
    assert m[0].recipe.input.scaling == "blockwise" and m[2].recipe.input.scaling == "current"
    rewind_promotions(m, load_recipe("v3_fp8"), later, [a])
    assert m[0].recipe.input.scaling == "current" and m[2].recipe.input.scaling == "delayed"
    assert m[0].weight is weight  # same Parameters: the optimizer state still applies
    m.load_state_dict(checkpoint)  # strict
    rewind_promotions(m, load_recipe("v3_fp8"), [a], [])  # back to no promotion at all
    assert m[0].recipe.name == "v3_fp8"
