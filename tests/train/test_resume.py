"""Checkpoints and resume: N steps + resume + N steps reproduce 2N uninterrupted steps exactly,
and a process killed while writing a checkpoint leaves the previous one loadable."""

from __future__ import annotations

import pytest

from tests.train.helpers import REPO, check_ok, clean_env, launch, metrics, output

# Evaluate and save at the split point in both runs, so both trajectories do the same work.
SPLIT = ("trainer.eval_every=3", "trainer.save_every=3", "optim.decay_steps=6",
         "trainer.fp8_telemetry_every=2")
COMPARED = ("tokens", "train/loss", "train/grad_norm", "train/lr", "val/loss")


def _same_records(expected: dict, actual: dict) -> None:
    assert sorted(actual) == sorted(expected)
    for step, record in expected.items():
        for key in [*COMPARED, *(k for k in record if k.startswith("fp8/"))]:
            assert actual[step].get(key) == record.get(key), (step, key)


# v3_fp8 only: the FP8 state (amax histories, scales) is what a resume can lose. A BF16 resume is
# checked step for step by test_kill_during_checkpoint_write_keeps_the_previous_one below.
@pytest.mark.parametrize("recipe", ["v3_fp8"])
def test_resume_reproduces_the_uninterrupted_run(tmp_path, recipe):
    full, split = tmp_path / "full", tmp_path / "split"
    check_ok(launch(full, f"+recipe={recipe}", *SPLIT, "trainer.max_steps=6"))
    check_ok(launch(split, f"+recipe={recipe}", *SPLIT, "trainer.max_steps=3"))
    resumed = check_ok(launch(split, f"+recipe={recipe}", *SPLIT, "trainer.max_steps=6"))
    assert f"resumed from {split / 'checkpoints' / 'step_0000003'} at step 3" in output(resumed)
    expected = metrics(full)
    assert any(k.startswith("fp8/") for k in expected[2]) == (recipe != "bf16")
    _same_records(expected, metrics(split))


def test_kill_during_checkpoint_write_keeps_the_previous_one(tmp_path):
    run = tmp_path / "run"
    args = ("+recipe=bf16", "trainer.max_steps=6", "trainer.save_every=2")
    killed = launch(run, *args, script=REPO / "tests" / "train" / "kill_during_save.py",
                    env=clean_env(KILL_DURING_SAVE_OF="step_0000004"))
    assert killed.returncode == 9, output(killed)[-4000:]
    checkpoints = run / "checkpoints"
    assert (checkpoints / "latest").read_text() == "step_0000002"
    assert not (checkpoints / "step_0000004" / "fp8train_meta.json").exists()  # torn, not committed
    before = metrics(run)
    assert sorted(before) == [1, 2, 3, 4]

    resumed = check_ok(launch(run, *args))
    assert f"resumed from {checkpoints / 'step_0000002'} at step 2" in output(resumed)
    after, discarded = metrics(run), metrics(run, "metrics.discarded.jsonl")
    assert sorted(after) == [1, 2, 3, 4, 5, 6] and sorted(discarded) == [3, 4]
    for step in (3, 4):  # the replayed steps match what the killed run had computed
        assert after[step]["train/loss"] == discarded[step]["train/loss"]
    assert (checkpoints / "latest").read_text() == "step_0000006"
    assert sorted(p.name for p in checkpoints.glob("step_*")) == ["step_0000004", "step_0000006"]
