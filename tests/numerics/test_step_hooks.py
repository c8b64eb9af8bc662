"""The per-step FP8 hooks (issue #12): nothing to do without FP8 state, and no needless host work.

A model whose layers all stayed BF16 (recipe bf16, or the precision policy kept every layer) has
no FP8 state, so the trainer skips the hooks and runs the BF16 step; `has_fp8_state` says so. With
FP8 layers, one walk of the model finds both the delayed casters and the weight-cached layers,
and turning telemetry off on casters where it already is off writes nothing."""

import torch
from torch import nn

from fp8train.numerics import after_optimizer_step, convert_to_fp8, has_fp8_state, load_recipe, set_fp8_telemetry
from fp8train.numerics.role_caster import RoleCaster
from fp8train.numerics.step_update import fp8_members


def _model(recipe: str = "hybrid") -> nn.Module:
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32))
    convert_to_fp8(model, load_recipe(recipe), backend="emulated")
    return model


def test_has_fp8_state_only_with_fp8_layers():
    plain = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 32))
    assert not has_fp8_state(plain)
    convert_to_fp8(plain, load_recipe("hybrid"), module_filter=lambda fqn, m: "kept in bf16")
    assert not has_fp8_state(plain)  # a policy that keeps every layer: nothing FP8 to update
    assert has_fp8_state(_model("hybrid")) and has_fp8_state(_model("current"))


def test_one_walk_finds_delayed_casters_and_cached_layers():
    model = _model("hybrid")
    casters, cached = fp8_members(model)
    assert casters == [m for m in model.modules() if isinstance(m, RoleCaster) and m.delayed] and len(casters) == 6
    assert cached == [model[0], model[2]]
    assert fp8_members(_model("current"))[0] == []  # current scaling: no delayed state


def test_after_optimizer_step_invalidates_every_cache_and_advances_delayed_state():
    model = _model("hybrid")
    model(torch.randn(8, 64)).sum().backward()
    generations = [layer._cache_generation for layer in (model[0], model[2])]
    after_optimizer_step(model)
    assert [layer._cache_generation for layer in (model[0], model[2])] == [g + 1 for g in generations]
    assert model._fp8_delayed_bank.casters == fp8_members(model)[0]  # every delayed caster banked, updated
    assert any(float(c.scale) != 1.0 for c in fp8_members(model)[0])  # the recorded amaxes set new scales


def test_telemetry_off_writes_nothing_when_already_off(monkeypatch):
    model = _model("hybrid")
    writes = []
    original = RoleCaster.__setattr__
    monkeypatch.setattr(RoleCaster, "__setattr__", lambda self, k, v: (writes.append(k), original(self, k, v)))
    set_fp8_telemetry(model, False)
    assert writes == []  # already off: no nn.Module.__setattr__ per caster
    set_fp8_telemetry(model, True)
    assert writes.count("collect_telemetry") == 6
    model(torch.randn(8, 64)).sum().backward()
    writes.clear()
    set_fp8_telemetry(model, False)
    assert sorted(set(writes)) == ["collect_telemetry", "last_stats"]
    assert all(not c.collect_telemetry and c.last_stats == {} for c in model.modules() if isinstance(c, RoleCaster))
