"""The per-layer precision policy: decisions from a (synthetic) crossover table, the report's
reasons, the table file format, estimates for unmeasured shapes, and the start-up calibration's
cache, all on CPU with made-up timings (the real timer needs a GPU: scripts/gpu/dense.sh)."""

import pytest
import torch
from torch import nn

from fp8train import models
from fp8train.numerics import FP8Linear, convert_to_fp8, load_recipe
from fp8train.numerics.calibration import cache_path, calibrated_table, linear_shapes
from fp8train.numerics.crossover import CROSSOVER_DIR, CrossoverTable, GemmShape, Measurement, find_table, \
    load_crossover, parse_crossover, recipe_class, shipped_crossovers
from fp8train.numerics.precision_policy import PolicyMode, PrecisionPolicy, policy_mode

TOKENS = 256


def _table(*rows, klass="delayed") -> CrossoverTable:
    return CrossoverTable("Test GPU", klass, tuple(Measurement(GemmShape(*shape), s) for shape, s in rows),
                          "synthetic.yaml", "made up")


def _model():
    torch.manual_seed(0)
    return models.build_model(models.model_config("tiny", 64, 16))  # d 128, ffn 384, 2 layers


TINY_TABLE = _table(((TOKENS, 128, 128), 0.71), ((TOKENS, 128, 384), 1.08), ((TOKENS, 384, 128), 1.30))


def test_layers_below_the_crossover_stay_bf16_with_the_reason():
    model = _model()
    report = convert_to_fp8(model, load_recipe("hybrid"), module_filter=PrecisionPolicy(TINY_TABLE, TOKENS),
                            backend="emulated")
    fp8 = {f"layers.{i}.mlp.{n}" for i in range(2) for n in ("gate_proj", "up_proj", "down_proj")}
    assert set(report.converted) == fp8
    assert all(isinstance(model.get_submodule(n), FP8Linear) for n in fp8)
    reasons = dict(report.skipped)
    assert type(model.layers[0].attn.q_proj) is nn.Linear
    assert reasons["layers.0.attn.q_proj"] == ("bf16: 128->128 at 256 tokens measured 0.71x on Test GPU "
                                               "(delayed, synthetic.yaml); FP8 needs >= 1.00x")
    assert "stays in high precision" in reasons["lm_head"], "the base filter still applies"
    text = str(report)
    assert "precision policy: bf16 for 128->128 at 256 tokens (measured 0.71x): 8 layer(s)" in text
    assert "precision policy: fp8 for 128->384 at 256 tokens (measured 1.08x): 4 layer(s)" in text
    assert "precision policy: 6 of 14 eligible layer(s) in FP8 on Test GPU" in text


def test_min_speedup_moves_the_crossover():
    model = _model()
    report = convert_to_fp8(model, load_recipe("current"), backend="emulated",
                            module_filter=PrecisionPolicy(TINY_TABLE, TOKENS, min_speedup=1.2))
    assert sorted(report.converted) == ["layers.0.mlp.down_proj", "layers.1.mlp.down_proj"]
    assert "FP8 needs >= 1.20x" in dict(report.skipped)["layers.0.mlp.up_proj"]


def test_no_table_converts_everything_and_says_why():
    model = _model()
    policy = PrecisionPolicy(None, TOKENS, unavailable="no crossover table for cpu / delayed")
    report = convert_to_fp8(model, load_recipe("hybrid"), module_filter=policy, backend="emulated")
    assert len(report.converted) == 14
    assert "precision policy: no crossover table for cpu / delayed" in str(report)


def test_unmeasured_shapes_interpolate_in_log_flops_and_clamp_at_the_ends():
    table = _table(((1024, 1024, 1024), 0.5), ((4096, 1024, 1024), 1.5))  # 4x apart in FLOPs
    speedup, how = table.estimate(GemmShape(2048, 1024, 1024))  # halfway in log2(FLOPs)
    assert speedup == pytest.approx(1.0) and how.startswith("estimated (between measured")
    assert table.estimate(GemmShape(1024, 1024, 2048))[0] == pytest.approx(1.0), "same FLOPs, same estimate"
    assert table.estimate(GemmShape(64, 64, 64)) == (0.5, "estimated (beyond the measured sizes; nearest "
                                                           "1024->1024 at 1024 tokens)")
    assert table.estimate(GemmShape(65536, 8192, 8192))[0] == 1.5
    assert table.estimate(GemmShape(4096, 1024, 1024)) == (1.5, "measured")


def test_recipe_classes_and_the_shipped_h100_table():
    assert [recipe_class(load_recipe(n)) for n in ("hybrid", "v3_fp8", "current", "blockwise", "rowwise")] == \
        ["delayed", "delayed", "current", "blockwise", "rowwise"]
    crossovers = shipped_crossovers()
    assert crossovers and all(c.tables for c in crossovers)
    for klass in ("delayed", "current", "blockwise"):
        assert find_table(crossovers, "NVIDIA H100 80GB HBM3", klass) is not None
    assert find_table(crossovers, "cpu", "delayed") is None
    assert list(CROSSOVER_DIR.glob("*.yaml"))


def test_bad_table_and_bad_mode_are_named():
    with pytest.raises(ValueError, match="tokens, in, out and speedup"):
        parse_crossover({"device": "X", "classes": {"delayed": [{"tokens": 1, "in": 2}]}}, "t.yaml")
    with pytest.raises(ValueError, match="needs 'device' and 'classes"):
        parse_crossover({"classes": {}}, "t.yaml")
    with pytest.raises(ValueError, match=r"trainer.precision_policy='fast' is not allowed; choose one of "
                                         r"\['off', 'table', 'calibrate'\]"):
        policy_mode("fast", "trainer.precision_policy")
    assert policy_mode("table") is PolicyMode.TABLE
    with pytest.raises(ValueError, match="min_speedup must be > 0"):
        PrecisionPolicy(TINY_TABLE, TOKENS, min_speedup=0)


def test_calibration_measures_each_shape_once_and_caches_per_device(tmp_path):
    calls = []

    def timer(shape, recipe):  # BF16 time grows with FLOPs; FP8 pays a fixed cast cost
        calls.append(shape)
        bf16 = shape.flops / 1e9
        return bf16, bf16 / 2 + 0.01 * (shape.in_features + shape.out_features) / 128, "synthetic"

    shapes = linear_shapes(_model(), TOKENS)
    assert shapes == [GemmShape(TOKENS, 128, 128), GemmShape(TOKENS, 128, 384), GemmShape(TOKENS, 384, 128)]
    recipe = load_recipe("hybrid")
    table = calibrated_table(shapes, recipe, tmp_path, "Test GPU 80GB", timer)
    assert calls == shapes and table.recipe_class == "delayed"
    path = cache_path(tmp_path, "Test GPU 80GB")
    assert path.is_file() and path.name.startswith("test_gpu_80gb-torch")
    again = calibrated_table(shapes, load_recipe("v3_fp8"), tmp_path, "Test GPU 80GB", timer)
    assert calls == shapes, "same class, same shapes: nothing measured again"
    assert again.measurements == table.measurements
    calibrated_table(shapes, load_recipe("current"), tmp_path, "Test GPU 80GB", timer)
    assert len(calls) == 6, "another recipe class is measured separately"
    stored = load_crossover(path)
    assert set(stored.tables) == {"delayed", "current"} and stored.device == "Test GPU 80GB"
    bigger = shapes + [GemmShape(4 * TOKENS, 128, 128)]
    calibrated_table(bigger, recipe, tmp_path, "Test GPU 80GB", timer)
    assert calls[-1] == GemmShape(4 * TOKENS, 128, 128) and len(calls) == 7, "only the new shape"


def test_calibration_methods_cache_apart_and_a_bad_method_is_named(tmp_path):
    shapes = [GemmShape(16384, 768, 768)]
    recipe = load_recipe("hybrid")
    streamed = calibrated_table(shapes, recipe, tmp_path, "Test GPU", lambda s, r: (1.0, 2.0, "streamed"))
    graphed = calibrated_table(shapes, recipe, tmp_path, "Test GPU", lambda s, r: (2.0, 1.0, "CUDA graphs"),
                               method="graphs")
    assert streamed.measurements[0].speedup == 0.5 and graphed.measurements[0].speedup == 2.0
    assert cache_path(tmp_path, "Test GPU").is_file() and cache_path(tmp_path, "Test GPU", "graphs").is_file()
    with pytest.raises(ValueError, match="calibration method 'cuda'"):
        calibrated_table(shapes, recipe, tmp_path, "Test GPU", method="cuda")
