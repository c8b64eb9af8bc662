"""End to end under torchrun with 2 processes (gloo on CPU, emulated FP8): the issue's checks."""

from __future__ import annotations

import shutil

import pytest

from tests.train.helpers import check_ok, launch, metrics, summary

pytestmark = pytest.mark.slow


def test_torchrun_v3_fp8_learns_and_writes_every_output(tmp_path):
    """The default data and batch, shortened: loss must fall clearly below the unigram entropy."""
    check_ok(launch(tmp_path, "+recipe=v3_fp8", "trainer.max_steps=40", "trainer.eval_every=20",
                    "trainer.save_every=20", "trainer.fp8_telemetry_every=10", "data.val_batches=4",
                    "logger.progress_bar=false", nproc=2, fast=False))
    records, result = metrics(tmp_path), summary(tmp_path)
    assert sorted(records) == list(range(1, 41))
    for key in ("tokens", "train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s"):
        assert key in records[1]
    assert "val/loss" in records[20] and "val/ppl" in records[40]
    assert any(key.startswith("fp8/layers.0.") for key in records[10])
    assert result["world_size"] == 2 and result["recipe"] == "v3_fp8" and not result["preempted"]
    assert result["final_val_loss"] < result["unigram_entropy"] - 0.2, result
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_0000040"
    assert list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert sorted(p.name for p in tmp_path.glob("train.rank*.log")) == ["train.rank0.log",
                                                                       "train.rank1.log"]


@pytest.mark.parametrize("recipe,zero_stage", [("bf16", 0), ("hybrid", 1), ("blockwise", 2),
                                               ("v3_fp8", 3)])
def test_torchrun_recipes_and_zero_stages_train(tmp_path, recipe, zero_stage):
    check_ok(launch(tmp_path, f"+recipe={recipe}", f"deepspeed.zero_stage={zero_stage}",
                    "trainer.max_steps=12", "trainer.eval_every=12", nproc=2))
    records, result = metrics(tmp_path), summary(tmp_path)
    assert records[12]["train/loss"] < records[1]["train/loss"] - 0.5, (records[1], records[12])
    assert result["final_val_loss"] < 5.0 and result["recipe"] == recipe
    assert (tmp_path / "checkpoints" / "step_0000012" / "fp8train_meta.json").is_file()


@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")), reason="Inductor on CPU needs a C++ compiler")
def test_compiled_model_trains_like_the_eager_one(tmp_path):
    """trainer.compile=true: same FP8 recipe, same data: the losses follow the eager run's."""
    eager_dir, compiled_dir = tmp_path / "eager", tmp_path / "compiled"
    for run_dir, flag in ((eager_dir, "false"), (compiled_dir, "true")):
        result = check_ok(launch(run_dir, "+recipe=hybrid", f"trainer.compile={flag}", "trainer.max_steps=6",
                                 "trainer.eval_every=6", "deepspeed.zero_stage=0", timeout=900))
    assert "torch.compile on" in (compiled_dir / "train.rank0.log").read_text() + result.stdout + result.stderr
    eager, compiled = metrics(eager_dir), metrics(compiled_dir)
    for step in (1, 6):
        assert abs(compiled[step]["train/loss"] - eager[step]["train/loss"]) < 1e-3 * eager[step]["train/loss"], \
            (step, eager[step]["train/loss"], compiled[step]["train/loss"])
