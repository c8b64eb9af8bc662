"""Recipes are data: presets load, a new YAML file needs no code, bad keys and impossible
combinations raise ValueError naming the culprit, and percentile clipping shows in telemetry."""

import pytest
import torch

from fp8train.quant import GemmClass
from fp8train.numerics import FP8Linear, fp8_telemetry, list_recipes, load_recipe, set_fp8_telemetry
from tests.numerics.helpers import make_recipe

PRESETS = {"bf16", "blockwise", "current", "hybrid", "rowwise", "v3_fp8", "v3_fp8_blockwise"}


def roles(**per_role) -> dict:
    return {r: per_role.get(r, {"format": "e4m3", "scaling": "current"}) for r in ("input", "weight", "grad_output")}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_loads(name):
    recipe = load_recipe(name)
    assert recipe.name == name and recipe.enabled == (name != "bf16")


def test_list_recipes_names_the_presets():
    assert set(list_recipes()) == PRESETS


@pytest.mark.parametrize("name, formats, scaling", [
    ("hybrid", ("e4m3", "e4m3", "e5m2"), "delayed"),
    ("v3_fp8", ("e5m2", "e4m3", "e4m3"), "delayed"),
    ("current", ("e4m3", "e4m3", "e5m2"), "current"),
    ("rowwise", ("e4m3", "e4m3", "e4m3"), "rowwise"),
    ("blockwise", ("e4m3", "e4m3", "e4m3"), "blockwise"),
    ("v3_fp8_blockwise", ("e5m2", "e4m3", "e4m3"), "blockwise")])
def test_preset_contents_match_the_issue(name, formats, scaling):
    recipe = load_recipe(name)
    assert tuple(recipe.role(r).format for r in ("input", "weight", "grad_output")) == formats
    assert {recipe.role(r).scaling for r in ("input", "weight", "grad_output")} == {scaling}


def test_hybrid_is_te_delayed_scaling_default():
    role = load_recipe("hybrid").input
    assert (role.history_len, role.amax_compute_algo, role.margin) == (1024, "max", 0)


def test_unknown_top_level_key_raises_naming_it():
    with pytest.raises(ValueError, match="unknown key.*'histroy_len'.*allowed keys"):
        make_recipe(histroy_len=8)


def test_unknown_role_key_raises_naming_key_and_role():
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['scalng'\] in recipe.weight"):
        make_recipe(weight={"format": "e4m3", "scalng": "current"})


def test_mixed_granularity_raises():
    with pytest.raises(ValueError, match="share one scaling granularity.*'input': 'rowwise'"):
        make_recipe(**roles(input={"format": "e4m3", "scaling": "rowwise"},
                            weight={"format": "e4m3", "scaling": "delayed"}))


def test_delayed_and_current_mix_is_allowed_both_tensorwise():
    recipe = make_recipe(**roles(weight={"format": "e4m3", "scaling": "delayed"}))
    assert recipe.gemm_class is GemmClass.TENSORWISE


@pytest.mark.parametrize("role", ["weight", "grad_output"])
def test_percentile_on_non_activation_role_raises(role):
    with pytest.raises(ValueError, match=f"recipe.{role}.amax_percentile"):
        make_recipe(**roles(**{role: {"format": "e4m3", "scaling": "current", "amax_percentile": 99.0}}))


@pytest.mark.parametrize("settings, match", [
    ({"scaling": "rowwise", "amax_percentile": 99.0}, "needs per-tensor scaling"),
    ({"scaling": "current", "amax_percentile": 0.0}, r"must be in \(0, 100\]"),
    ({"scaling": "current", "amax_percentile": 100.5}, r"must be in \(0, 100\]")])
def test_bad_percentile_settings_raise(settings, match):
    with pytest.raises(ValueError, match=match):
        make_recipe(**roles(input={"format": "e4m3", **settings}))


@pytest.mark.parametrize("settings, match", [
    ({"format": "e4m4", "scaling": "current"}, "recipe.input.format: unknown number format 'e4m4'"),
    ({"format": "e4m3", "scaling": "tilewise"}, "recipe.input.scaling='tilewise'"),
    ({"format": "e4m3", "scaling": "delayed", "amax_compute_algo": "mean"}, "amax_compute_algo='mean'"),
    ({"format": "e4m3", "scaling": "delayed", "history_len": 0}, "history_len must be an integer >= 1"),
    ({"format": "e4m3", "scaling": "delayed", "margin": -1}, "margin must be a number >= 0")])
def test_bad_values_raise_naming_them(settings, match):
    with pytest.raises(ValueError, match=match):
        make_recipe(**roles(input=settings))


def test_bad_backend_and_unknown_preset_raise():
    with pytest.raises(ValueError, match="recipe.backend='cublas'"):
        make_recipe(backend="cublas")
    with pytest.raises(ValueError, match="unknown recipe 'v4_fp8'.*available presets"):
        load_recipe("v4_fp8")


def test_new_recipe_yaml_file_loads_with_no_code_change(tmp_path):
    path = tmp_path / "my_recipe.yaml"
    path.write_text("name: my_recipe\nbackend: emulated\n"
                    "input: {format: e4m3, scaling: delayed, history_len: 32, margin: 1}\n"
                    "weight: {format: e4m3, scaling: current, power_of_2: true}\n"
                    "grad_output: {format: e5m2, scaling: delayed, amax_compute_algo: most_recent}\n")
    recipe = load_recipe(path)
    assert recipe.name == "my_recipe" and recipe.input.history_len == 32 and recipe.weight.power_of_2
    layer = FP8Linear(64, 32, recipe=recipe)
    layer(torch.randn(8, 64)).sum().backward()
    assert layer.input_caster.amax_history.shape == (32,)
    assert load_recipe(str(path)) == recipe


def percentile_saturation(percentile: float) -> float:
    recipe = make_recipe(**roles(input={"format": "e4m3", "scaling": "current", "amax_percentile": percentile}))
    model = torch.nn.Sequential(FP8Linear(256, 128, recipe=recipe))
    set_fp8_telemetry(model, True)
    model(torch.randn(512, 256))
    return fp8_telemetry(model)["fp8/0/input/saturated"]


def test_percentile_clipping_shows_saturation_in_telemetry():
    clipped = percentile_saturation(99.0)
    assert 0.004 < clipped < 0.01  # about 1% of a Gaussian lies above its 99th percentile
    assert percentile_saturation(100.0) == 0.0
