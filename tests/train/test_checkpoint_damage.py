"""Damaged checkpoints (issue 13, items 3 and 5): a truncated file or a corrupt meta file is named
in one line with the newest older good checkpoint; resume=auto falls back to it and says so."""

from __future__ import annotations

import shutil

import pytest

from tests.train.helpers import check_ok, events, launch, metrics, output

ARGS = ("+recipe=bf16", "trainer.save_every=2", "optim.decay_steps=6", "trainer.eval_every=100")
MODEL_FILE = "mp_rank_00_model_states.pt"


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("damage") / "run"
    check_ok(launch(run_dir, *ARGS, "trainer.max_steps=4"))  # step_0000002 and step_0000004
    return run_dir


def _copy(run_dir, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    return copy, copy / "checkpoints"


def _truncate(path, keep: int = 100_000) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def test_resume_auto_falls_back_past_a_truncated_file_and_says_so(two_checkpoints, tmp_path):
    run_dir, checkpoints = _copy(two_checkpoints, tmp_path)
    before = metrics(run_dir)
    _truncate(checkpoints / "step_0000004" / MODEL_FILE)
    result = check_ok(launch(run_dir, *ARGS, "trainer.max_steps=6"))
    text = output(result)
    assert (f"checkpoint {checkpoints / 'step_0000004'} is damaged: {MODEL_FILE} has 100000 bytes"
            in text) and f"resuming from the newest complete checkpoint {checkpoints / 'step_0000002'}" in text
    assert "PytorchStreamReader" not in text
    moved = checkpoints / "abandoned" / "001_after_step_0000002" / "step_0000004" / MODEL_FILE
    assert moved.stat().st_size == 100_000  # set aside as it was, never deleted
    (branch,) = events(run_dir)
    assert branch["reason"] == "resume=auto fell back past a damaged checkpoint"
    after = metrics(run_dir)
    assert sorted(after) == list(range(1, 7))
    assert [after[s]["train/loss"] for s in (3, 4)] == [before[s]["train/loss"] for s in (3, 4)]


def test_an_explicit_damaged_checkpoint_is_named_with_the_older_good_one(two_checkpoints, tmp_path):
    run_dir, checkpoints = _copy(two_checkpoints, tmp_path)
    _truncate(checkpoints / "step_0000004" / MODEL_FILE)
    result = launch(run_dir, *ARGS, "trainer.max_steps=6", f"trainer.resume={checkpoints / 'step_0000004'}")
    text = output(result)
    assert result.returncode == 2, text[-3000:]
    error = text[text.index("fp8train: error: "):].strip()
    assert len(error.splitlines()) == 1 and "Traceback" not in text
    assert f"{MODEL_FILE} has 100000 bytes" in error
    assert f"The newest older good checkpoint is {checkpoints / 'step_0000002'}" in error


def test_a_corrupt_meta_file_is_named_and_called_corrupt(two_checkpoints, tmp_path):
    run_dir, checkpoints = _copy(two_checkpoints, tmp_path)
    meta = checkpoints / "step_0000004" / "fp8train_meta.json"
    meta.write_text(meta.read_text()[:40])
    result = launch(run_dir, *ARGS, "trainer.max_steps=6", f"trainer.resume={checkpoints / 'step_0000004'}")
    text = output(result)
    assert result.returncode == 2, text[-3000:]
    assert f"{meta} is corrupt (not valid JSON" in text and "step_0000002" in text
