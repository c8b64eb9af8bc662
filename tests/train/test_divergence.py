"""A diverging run is never silent and never destroys a good checkpoint (issue 13, item 1), and
trainer.on_divergence=rollback continues as a rollback made by hand would, bit for bit."""

from __future__ import annotations

import torch

from fp8train.train.checkpoint import Checkpointer, find_checkpoint
from tests.train.helpers import REPO, check_ok, clean_env, events, launch, metrics, output, summary

INJECT = REPO / "tests" / "train" / "inject_faults.py"


def _finite_weights(tag_dir) -> bool:
    states = torch.load(tag_dir / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    return all(torch.isfinite(v).all() for v in states.values() if v.is_floating_point())


def test_the_issue_run_stops_with_a_clear_error_and_keeps_its_last_good_checkpoint(tmp_path):
    """The issue's command: lr=1e10 blows the loss up to ~1e26 and the gradients to inf."""
    result = launch(tmp_path, "+recipe=v3_fp8", "optim.lr=1e10", "trainer.max_steps=6",
                    "trainer.save_every=1", "trainer.keep_last=2", "optim.warmup_steps=20")
    text = output(result)
    assert result.returncode == 3, text[-4000:]
    error = text[text.index("fp8train: error: "):]
    assert "training diverged: 3 non-finite step(s) in a row (3, 4, 5)" in error
    assert "trainer.max_bad_steps=3" in error and "step 5 was not applied" in error
    assert "gradient norm inf" in error and "non-finite buffers (FP8 amax/scale) in layers." in error
    assert f"the newest checkpoint, {tmp_path / 'checkpoints' / 'step_0000002'}, holds finite" in error
    assert "Max_MA" not in text and "CPU Virtual Memory" not in text  # item 8: quiet by default
    records = metrics(tmp_path)
    assert [records[s].get("train/skipped") for s in (1, 2, 3, 4, 5)] == [None, None, 1, 1, 1]
    assert [records[s]["train/lr"] for s in (3, 4, 5)] == [1.5e9, 2e9, 2.5e9]  # the schedule moves on
    checkpoints = tmp_path / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("step_*")) == ["step_0000001", "step_0000002"]
    assert all(_finite_weights(p) for p in checkpoints.glob("step_*"))
    ref = find_checkpoint("auto", tmp_path)
    assert ref.tag == "step_0000002" and not Checkpointer(tmp_path, 2, {}, 0, 1).problems(ref)
    assert summary(tmp_path)["diverged"] and summary(tmp_path)["skipped_steps"] == 3


def test_rollback_reloads_the_last_good_checkpoint_and_skips_the_bad_data(tmp_path):
    """NaN losses at steps 5-7: roll back to step 4, skip the data of 5..7, train 8..10; the same
    as resuming step_0000004 by hand at step 7 (the reference run), bit for bit."""
    args = ("+recipe=v3_fp8", "trainer.max_steps=10", "trainer.save_every=2", "trainer.keep_last=4",
            "trainer.eval_every=10", "optim.decay_steps=10")
    auto, by_hand = tmp_path / "auto", tmp_path / "by_hand"
    check_ok(launch(auto, *args, "trainer.on_divergence=rollback", script=INJECT,
                    env=clean_env(FP8TRAIN_TEST_NAN_STEPS="5,6,7")))
    (event,) = events(auto)
    assert event["event"] == "rollback" and event["checkpoint"] == "step_0000004"
    assert event["step"] == 7 and event["skipped_data_steps"] == [5, 7]
    assert sorted(metrics(auto)) == [1, 2, 3, 4, 8, 9, 10]  # the rolled-back steps moved aside
    assert sorted(metrics(auto, "metrics.discarded.jsonl")) == [5, 6, 7]
    assert summary(auto)["rollbacks"] == 1 and summary(auto)["skipped_steps"] == 3
    # saved right after the rollback (step 7: weights of step 4, data past the bad window)
    assert sorted(p.name for p in (auto / "checkpoints").glob("step_*")) == [
        "step_0000004", "step_0000007", "step_0000008", "step_0000010"]
    resumed = check_ok(launch(by_hand, *args, f"trainer.resume={auto / 'checkpoints' / 'step_0000004'}",
                              "logger.verbose=true", script=INJECT,
                              env=clean_env(FP8TRAIN_TEST_RESUME_AT_STEP="7")))
    assert "Max_MA" in output(resumed)  # item 8: DeepSpeed's memory report with logger.verbose
    expected, actual = metrics(by_hand), metrics(auto)
    assert sorted(expected) == [8, 9, 10]
    for step in expected:
        for key in ("train/loss", "train/grad_norm", "train/lr", "val/loss"):
            assert actual[step].get(key) == expected[step].get(key), (step, key)
