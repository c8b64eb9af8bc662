"""Resuming from an older checkpoint starts a branch (issue 13, item 2): the newer checkpoints are
set aside, never deleted, `latest` cannot return to them after a crash, and metrics.jsonl holds
one trajectory with an event record saying where the branch starts."""

from __future__ import annotations

from fp8train.sweep.runs import load_run
from fp8train.train.checkpoint import Checkpointer, read_checkpoint
from tests.train.helpers import REPO, check_ok, clean_env, events, launch, metrics, output

ARGS = ("+recipe=bf16", "trainer.save_every=2", "optim.decay_steps=8", "trainer.eval_every=100")


def test_rollback_by_hand_then_a_crash_does_not_return_to_the_abandoned_branch(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    check_ok(launch(tmp_path, *ARGS, "trainer.max_steps=6"))  # keeps step 4 and step 6
    killed = launch(tmp_path, *ARGS, "trainer.max_steps=8", f"trainer.resume={checkpoints / 'step_0000004'}",
                    script=REPO / "tests" / "train" / "kill_during_save.py",
                    env=clean_env(KILL_DURING_SAVE_OF="step_0000006"))  # dies saving the new step 6
    assert killed.returncode == 9, output(killed)[-4000:]
    abandoned = checkpoints / "abandoned" / "001_after_step_0000004" / "step_0000006"
    ref = read_checkpoint(abandoned.parent, abandoned.name)  # the old branch's step 6, intact
    assert ref.step == 6 and not Checkpointer(tmp_path, 2, {}, 0, 1).problems(ref)
    assert (checkpoints / "latest").read_text() == "step_0000004"
    (branch,) = events(tmp_path)
    assert branch["event"] == "branch" and branch["step"] == 4 and branch["abandoned"] == ["step_0000006"]
    killed_steps = metrics(tmp_path)

    resumed = check_ok(launch(tmp_path, *ARGS, "trainer.max_steps=8"))  # resume=auto
    assert f"resumed from {checkpoints / 'step_0000004'} at step 4" in output(resumed)
    final = metrics(tmp_path)
    assert sorted(final) == list(range(1, 9))
    for step in (5, 6):  # the replay of the live branch matches what the killed run computed
        assert final[step]["train/loss"] == killed_steps[step]["train/loss"]
    assert sorted(metrics(tmp_path, "metrics.discarded.jsonl")) == [5, 6]  # old and killed 5, 6
    assert len((tmp_path / "metrics.discarded.jsonl").read_text().splitlines()) == 4
    assert [e["event"] for e in events(tmp_path)] == ["branch"]
    assert load_run(tmp_path).steps == list(range(1, 9))  # metric readers see one trajectory
    assert (checkpoints / "latest").read_text() == "step_0000008"
