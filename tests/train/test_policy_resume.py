"""A resume builds the FP8 layer set its checkpoint was trained with (precision_policy.json), not
what this launch's precision policy would decide now (a calibrated layer near the threshold, a
requeue onto another card). Before the file existed, such a resume failed loading the weights."""

import json

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from fp8train.train import precision
from fp8train.train import trainer as trainer_module
from fp8train.train.config import resolve
from fp8train.train.trainer import Trainer
from tests.train.helpers import REPO

pytestmark = pytest.mark.slow
TINY = ["logger.mode=disabled", "logger.progress_bar=false", "data.seq_len=32", "trainer.micro_batch_size=4",
        "trainer.global_batch_size=4", "data.val_batch_size=4", "data.val_batches=1", "trainer.compile=false",
        "+recipe=hybrid", "trainer.fp8_warm_start=false"]


def _trainer(run_dir, *overrides):
    from fp8train.numerics.recipe import RECIPES_DIR
    from fp8train.train.run_id import register_run_id_resolver
    from fp8train.train.schema import register_recipes, register_schema

    register_schema()
    register_recipes(RECIPES_DIR)
    register_run_id_resolver()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*TINY, *overrides])
    (run_dir / ".hydra").mkdir(parents=True, exist_ok=True)  # what launch/train.py's Hydra writes
    (run_dir / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    return Trainer(resolve(cfg, run_dir))


def test_resume_keeps_the_checkpoints_fp8_layers(tmp_path, monkeypatch):
    # the first launch's policy keeps every MLP projection in BF16 (as a calibration might)
    def mlp_in_bf16(fqn, module):
        return "bf16: test policy" if ".mlp." in fqn else precision.default_filter(fqn, module)

    monkeypatch.setattr(trainer_module, "build_policy", lambda *args, **kwargs: mlp_in_bf16)
    first = _trainer(tmp_path, "trainer.max_steps=2")
    try:
        first._optimizer_step()
        saved = sorted(first.conversion_report.converted)
        tag_dir = first.save()
    finally:
        first.close()
    assert saved and not any(".mlp." in name for name in saved)
    assert json.loads((tag_dir / precision.POLICY_FILE).read_text())["fp8_layers"] == saved
    # the run's model rebuilt for evaluation / PTQ (fp8train.sweep.run_model) has the same layers
    from fp8train.numerics.linear import FP8Linear
    from fp8train.sweep.run_model import load_run_model

    model, _ = load_run_model(tmp_path, fp8=True)  # strict load: fails on another structure
    assert sorted(n for n, m in model.named_modules() if isinstance(m, FP8Linear)) == saved

    monkeypatch.undo()  # this launch's policy (off: every layer FP8) would decide differently
    resumed = _trainer(tmp_path, "trainer.max_steps=3", "trainer.precision_policy=off", f"trainer.resume={tag_dir}")
    try:
        assert sorted(resumed.conversion_report.converted) == saved
        assert any("recorded in" in note for note in resumed.conversion_report.notes)
        assert resumed.step == 1
        resumed._optimizer_step()  # the weights and FP8 state loaded into the same structure
    finally:
        resumed.close()
