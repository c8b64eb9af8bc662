"""Fast in-process checks of the pieces: DeepSpeed dict, LR schedule, checkpoint commit, metrics."""

from __future__ import annotations

import json
import math

import pytest
import torch

from fp8train.train import checkpoint
from fp8train.train.engine import check_deepspeed_config, deepspeed_config, warmup_cosine
from fp8train.train.logger import trim_metrics, wandb_run_id
from fp8train.train.schema import DeepSpeedConfig, Precision


def test_bf16_zero1_accumulates_in_fp32():
    config, notes = deepspeed_config(DeepSpeedConfig(), micro_batch_size=4, grad_accum_steps=3)
    assert config["bf16"] == {"enabled": True} and "fp16" not in config
    assert config["data_types"] == {"grad_accum_dtype": "fp32"} and notes == []
    assert config["train_micro_batch_size_per_gpu"] == 4
    assert config["gradient_accumulation_steps"] == 3
    assert config["zero_optimization"] == {"stage": 1} and config["gradient_clipping"] == 1.0


def test_stage0_cannot_accumulate_in_fp32_and_says_so():
    config, notes = deepspeed_config(DeepSpeedConfig(zero_stage=0), 4, 1)
    assert "data_types" not in config  # DeepSpeed raises for stage 0 + bf16 + fp32 accumulation
    assert len(notes) == 1 and "zero_stage >= 1" in notes[0]


def test_zero3_on_one_rank_says_what_it_costs():
    _, notes = deepspeed_config(DeepSpeedConfig(zero_stage=3), 4, 1, world_size=1)
    assert len(notes) == 1 and "zero_stage=3 on one rank" in notes[0] and "zero_stage=1" in notes[0]
    assert deepspeed_config(DeepSpeedConfig(zero_stage=3), 4, 1, world_size=2)[1] == []


def test_fp16_uses_dynamic_loss_scaling_and_fp32_has_no_mixed_block():
    fp16, _ = deepspeed_config(DeepSpeedConfig(precision=Precision.fp16, zero_stage=2), 4, 1)
    assert fp16["fp16"]["enabled"] and fp16["fp16"]["loss_scale"] == 0
    assert fp16["fp16"]["initial_scale_power"] == 16 and "bf16" not in fp16
    fp32, _ = deepspeed_config(DeepSpeedConfig(precision=Precision.fp32), 4, 1)
    assert "bf16" not in fp32 and "fp16" not in fp32 and "data_types" not in fp32


def test_deepspeed_checks_name_the_setting():
    with pytest.raises(ValueError, match="deepspeed.zero_stage=4"):
        check_deepspeed_config(DeepSpeedConfig(zero_stage=4), torch.device("cpu"))
    with pytest.raises(ValueError, match="deepspeed.precision=fp16 needs a CUDA GPU"):
        check_deepspeed_config(DeepSpeedConfig(precision=Precision.fp16), torch.device("cpu"))


def test_warmup_then_cosine_to_the_floor():
    multiplier = warmup_cosine(warmup_steps=4, decay_steps=14, min_lr_ratio=0.1)
    assert [multiplier(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert multiplier(9) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert multiplier(14) == pytest.approx(0.1) and multiplier(100) == pytest.approx(0.1)


def _fake_tag(directory, step, complete=True):
    tag = directory / checkpoint.tag_for(step)
    tag.mkdir(parents=True)
    (tag / "mp_rank_00_model_states.pt").write_bytes(b"x")
    if complete:
        (tag / checkpoint.META_FILE).write_text(json.dumps({"step": step, "fingerprint": {}}))
    return tag


def test_commit_points_latest_at_the_new_tag_and_prunes(tmp_path):
    saver = checkpoint.Checkpointer(tmp_path, keep_last=2, fingerprint={"m": 1}, rank=0,
                                    world_size=1)
    for step in (1, 2, 3):
        _fake_tag(saver.dir, step)
    _fake_tag(saver.dir, 9, complete=False)  # torn write of an earlier attempt
    _fake_tag(saver.dir, 4, complete=False)  # the tag being committed now: files written
    saver._commit(checkpoint.tag_for(4), 4, {})
    assert (saver.dir / checkpoint.LATEST_FILE).read_text() == "step_0000004"
    assert sorted(p.name for p in saver.dir.iterdir() if p.is_dir()) == ["step_0000003",
                                                                          "step_0000004"]
    ref = checkpoint.find_checkpoint("auto", tmp_path)
    assert ref.tag == "step_0000004" and ref.meta["fingerprint"] == {"m": 1}
    older = checkpoint.find_checkpoint(str(saver.dir / "step_0000003"), tmp_path)
    assert older.tag == "step_0000003"
    with pytest.raises(ValueError, match="already holds checkpoints"):
        checkpoint.find_checkpoint("none", tmp_path)  # would prune this run's checkpoints


def test_fresh_run_dir_starts_from_scratch_or_another_runs_checkpoint(tmp_path):
    assert checkpoint.find_checkpoint("auto", tmp_path / "new") is None
    assert checkpoint.find_checkpoint("none", tmp_path / "new") is None
    _fake_tag(tmp_path / "old" / "checkpoints", 5)
    ref = checkpoint.find_checkpoint(str(tmp_path / "old" / "checkpoints" / "step_0000005"),
                                     tmp_path / "new")
    assert ref.tag == "step_0000005" and ref.load_dir == tmp_path / "old" / "checkpoints"


def test_fingerprint_mismatch_names_both_shapes(tmp_path):
    ref = checkpoint.CheckpointRef(tmp_path, "step_0000001", {"fingerprint": {
        "model": {"d_model": 128, "n_layers": 2}, "recipe": "bf16"}})
    with pytest.raises(ValueError, match=r"it has d_model=128 but this run builds d_model=256"):
        checkpoint.check_fingerprint(ref, {"model": {"d_model": 256, "n_layers": 2},
                                           "recipe": "bf16"})
    with pytest.raises(ValueError, match=r"recipe 'bf16' but this run uses 'hybrid'"):
        checkpoint.check_fingerprint(ref, {"model": {"d_model": 128, "n_layers": 2},
                                           "recipe": "hybrid"})


def test_trim_metrics_moves_records_past_the_resume_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    records = [json.dumps({"step": step, "train/loss": step / 10}) for step in range(1, 6)]
    path.write_text("".join(f"{record}\n" for record in records))
    assert trim_metrics(path, 3) == 2
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]
    moved = (tmp_path / "metrics.discarded.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in moved] == [4, 5]
    assert trim_metrics(path, 3) == 0


def test_wandb_id_is_valid_and_stable(tmp_path):
    run_dir = tmp_path / "multirun" / "x" / ("0_trainer.max_steps=5,+recipe=bf16" + "y" * 80)
    run_id = wandb_run_id(run_dir)
    assert len(run_id) <= 64 and all(c.isalnum() or c in "-_" for c in run_id)
    assert run_id == wandb_run_id(run_dir)


def test_zero_options_reach_deepspeed_and_bad_ones_are_named():
    """+deepspeed.zero_options.<DeepSpeed name>=v goes into zero_optimization; a misspelt key, a bad
    value or `stage` stops the launch naming the key, checked by DeepSpeed's own schema."""
    good = DeepSpeedConfig(zero_stage=3, zero_options={"stage3_module_granularity_threshold": 10 ** 6,
                                                       "overlap_comm": True})
    config, _ = deepspeed_config(good, 4, 1, world_size=2)
    assert config["zero_optimization"] == {"stage": 3, "stage3_module_granularity_threshold": 10 ** 6,
                                           "overlap_comm": True}
    check_deepspeed_config(good, torch.device("cpu"))
    for options, message in [({"stage3_param_persistence_treshold": 1}, "stage3_param_persistence_treshold: Extra"),
                             ({"overlap_comm": "maybe"}, "overlap_comm: Input should be a valid boolean"),
                             ({"stage": 2}, "set the stage with deepspeed.zero_stage")]:
        with pytest.raises(ValueError, match=message) as error:
            check_deepspeed_config(DeepSpeedConfig(zero_stage=3, zero_options=options), torch.device("cpu"))
        assert "stage" in options or "stage3_param_persistence_threshold" in str(error.value)
