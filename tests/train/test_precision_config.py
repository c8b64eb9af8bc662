"""trainer.precision_policy / precision_min_speedup: checked at start-up, and the trainer's glue
(fp8train/train/precision.py) turns them into the module filter of the FP8 swap."""

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from fp8train import models
from fp8train.numerics import convert_to_fp8, load_recipe
from fp8train.numerics.crossover import CrossoverFile, CrossoverTable, GemmShape, Measurement
from fp8train.train import precision
from tests.train.helpers import launch, output


def _spec(policy: str, recipe: str = "hybrid", min_speedup: float = 1.0):
    trainer = SimpleNamespace(precision_policy=policy, precision_min_speedup=min_speedup, micro_batch_size=2,
                              precision_calibration="streamed")
    cfg = SimpleNamespace(trainer=trainer, data=SimpleNamespace(seq_len=16, cache_dir=None))
    return SimpleNamespace(cfg=cfg, recipe=load_recipe(recipe), device=torch.device("cpu"),
                           resume_from=None)


def _model():
    torch.manual_seed(0)
    return models.build_model(models.model_config("tiny", 64, 16))


def test_table_policy_uses_the_table_matching_this_device(monkeypatch):
    rows = (Measurement(GemmShape(32, 128, 128), 0.6), Measurement(GemmShape(32, 128, 384), 1.2))
    table = CrossoverTable("cpu", "delayed", rows, "fake.yaml", "made up")
    monkeypatch.setattr(precision, "shipped_crossovers",
                        lambda: [CrossoverFile("cpu", "cpu", "", "", "", {"delayed": table})])
    model = _model()
    policy = precision.build_policy(_spec("table"), model)
    assert policy.tokens == 32, "micro_batch_size x seq_len"
    report = convert_to_fp8(model, load_recipe("hybrid"), module_filter=policy, backend="emulated")
    assert len(report.converted) == 6 and all(".mlp." in name for name in report.converted)  # 384->128 estimated
    assert "bf16: 128->128 at 32 tokens measured 0.60x on cpu" in dict(report.skipped)["layers.0.attn.q_proj"]


def test_table_policy_takes_the_grouped_class_for_moe_expert_layers(monkeypatch):
    grouped = CrossoverTable("cpu", "grouped:delayed", (Measurement(GemmShape(64, 128, 128), 0.7),), "moe.yaml", "")
    dense = CrossoverTable("cpu", "delayed", (Measurement(GemmShape(32, 128, 128), 1.5),), "fake.yaml", "")
    monkeypatch.setattr(precision, "shipped_crossovers", lambda: [
        CrossoverFile("cpu", "cpu", "", "", "", {"delayed": dense, "grouped:delayed": grouped})])
    policy = precision.build_policy(_spec("table"), _model())
    assert policy.table is dense and policy.grouped_table is grouped


def test_no_table_for_this_device_keeps_fp8_and_notes_it():
    policy = precision.build_policy(_spec("table"), _model())
    assert policy.table is None
    report = convert_to_fp8(_model(), load_recipe("hybrid"), module_filter=policy, backend="emulated")
    assert len(report.converted) == 14
    assert "no crossover table for cpu / delayed" in str(report)


def test_off_and_bf16_recipe_build_no_policy():
    assert precision.build_policy(_spec("off"), _model()) is None
    assert precision.build_policy(_spec("table", recipe="bf16"), _model()) is None


def test_checks_name_the_setting():
    with pytest.raises(ValueError, match="choose one of"):
        precision.check_policy(_spec("fastest").cfg.trainer, torch.device("cpu"))
    with pytest.raises(ValueError, match="precision_min_speedup=0 must be > 0"):
        precision.check_policy(_spec("table", min_speedup=0).cfg.trainer, torch.device("cpu"))
    with pytest.raises(ValueError, match="calibrate times GEMMs on a CUDA GPU"):
        precision.check_policy(_spec("calibrate").cfg.trainer, torch.device("cpu"))
    bad_method = _spec("table").cfg.trainer
    bad_method.precision_calibration = "wallclock"
    with pytest.raises(ValueError, match="precision_calibration='wallclock'.*streamed"):
        precision.check_policy(bad_method, torch.device("cpu"))


def test_bad_policy_fails_before_training(tmp_path):
    result = launch(tmp_path, "+recipe=hybrid", "trainer.precision_policy=calibrate", "trainer.device=cpu")
    assert result.returncode != 0 and "trainer.precision_policy=calibrate times GEMMs" in output(result)
    assert not (tmp_path / "metrics.jsonl").exists()


def test_a_policy_that_leaves_no_fp8_layer_warns_with_the_fix(monkeypatch):
    """Every layer measured slow: the FP8 recipe would silently train in BF16; the trainer warns."""
    rows = (Measurement(GemmShape(32, 128, 128), 0.6), Measurement(GemmShape(32, 128, 384), 0.7))
    table = CrossoverTable("cpu", "delayed", rows, "fake.yaml", "made up")
    monkeypatch.setattr(precision, "shipped_crossovers",
                        lambda: [CrossoverFile("cpu", "cpu", "", "", "", {"delayed": table})])
    spec = _spec("table")
    policy = precision.build_policy(spec, _model())
    report = convert_to_fp8(_model(), load_recipe("hybrid"), module_filter=policy, backend="emulated")
    assert report.converted == []
    warning = precision.no_fp8_warning(spec, policy, report)
    assert "recipe 'hybrid' trains NO layer in FP8" in warning and "trainer.precision_policy=off" in warning
    assert "on cpu at 32 tokens per micro-batch" in warning
    # layers that pay (or the policy off) leave nothing to warn about
    assert precision.no_fp8_warning(spec, None, convert_to_fp8(_model(), load_recipe("hybrid"), backend="emulated")) is None
    monkeypatch.setattr(precision, "shipped_crossovers", lambda: [CrossoverFile(
        "cpu", "cpu", "", "", "", {"delayed": replace(table, measurements=(Measurement(GemmShape(32, 128, 384), 1.2),))})])
    policy = precision.build_policy(spec, _model())
    report = convert_to_fp8(_model(), load_recipe("hybrid"), module_filter=policy, backend="emulated")
    assert report.converted and precision.no_fp8_warning(spec, policy, report) is None


def test_inductor_cast_roles_are_checked_at_start_up():
    """trainer.inductor_cast_roles names operand roles; a typo is refused before anything runs."""
    from omegaconf import OmegaConf

    from fp8train.train.config import _check_trainer
    from fp8train.train.schema import TrainConfig

    cfg = OmegaConf.structured(TrainConfig)
    cfg.trainer.inductor_cast_roles = ["grad_output"]
    _check_trainer(cfg)
    cfg.trainer.inductor_cast_roles = ["grads"]
    with pytest.raises(ValueError, match=r"unknown role\(s\) \['grads'\]; choose from"):
        _check_trainer(cfg)
