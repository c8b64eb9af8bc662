"""Fault injection in CI: many cheap kill -9 trials of checkpoint writing, two seeded kill -9
trials of a training run (fault_launch.train_kill: a seeded step and fraction of a step, so inside
a save or a step), and one trial each of a full disk, a dataset changed under the running job and
a rank dying in a 2-process run. The full campaign (more kinds, more trials, a table):
python scripts/fault_injection.py --trials 50 (results: benchmarks/results/fault_campaign_cpu)."""

from __future__ import annotations

import pytest

from tests.train import fault_checkpoint, fault_launch

CHECKPOINT_TRIALS = 12


@pytest.mark.parametrize("seed", range(CHECKPOINT_TRIALS))
def test_kill_9_while_writing_checkpoints_loses_nothing(tmp_path, seed):
    row = fault_checkpoint.trial(tmp_path / "run", seed, rounds=3)
    assert row["outcome"] == "ok", row


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """(work folder, small dataset). No reference run here: each trial checks that the resumed
    run repeats, bit for bit, every step the broken run had logged (the CLI compares with one)."""
    workdir = tmp_path_factory.mktemp("faults")
    return workdir, fault_launch.small_dataset(workdir / "dataset")


# kill_point(Random(seed)): seed 10 = step 6 + 0.03 of a step, inside the save of step 6 (which
# also prunes step_2: keep_last=2); seed 4 = step 3 + 0.30, inside step 4's forward/backward.
@pytest.mark.slow
@pytest.mark.parametrize("seed", [10, 4])
def test_kill_9_inside_a_training_run_loses_nothing_and_the_resume_repeats_its_steps(job, seed):
    row = fault_launch.train_kill(*job, seed=seed, expected=None)
    assert row["outcome"] == "ok", row


@pytest.mark.slow
def test_a_full_disk_stops_the_run_naming_it_and_the_resume_matches(job):
    row = fault_launch.disk_full(*job, seed=0, expected=None)
    assert row["outcome"] == "ok", row


@pytest.mark.slow
def test_a_dataset_changed_under_the_run_stops_it_and_the_resume_matches(job):
    row = fault_launch.data_changed(*job, seed=0, expected=None)
    assert row["outcome"] == "ok", row


@pytest.mark.slow
def test_a_rank_dying_loses_nothing_and_the_resume_repeats_its_steps(job):
    row = fault_launch.rank_death(*job, seed=0, expected_2proc=None)
    assert row["outcome"] == "ok", row
