"""Checksums, damaged checkpoints, failed writes and branches, in process (a fake DeepSpeed engine
that writes DeepSpeed's file layout; tests/train/fault_checkpoint.py)."""

from __future__ import annotations

import errno
import json

import pytest

from fp8train.train import branching, checkpoint, integrity
from fp8train.train.checkpoint import (CheckpointWriteError, Checkpointer, find_checkpoint,
                                       read_checkpoint, tag_for)
from fp8train.train.logger import RunLogger, trim_metrics
from fp8train.train.schema import LoggerConfig, WandbMode
from tests.train.fault_checkpoint import MODEL_FILE, OPTIM_FILE, FakeEngine

FINGERPRINT = {"model": {"d_model": 8}, "recipe": "bf16"}


def saved(run_dir, *steps, engine=None):
    saver, engine = Checkpointer(run_dir, 3, FINGERPRINT, 0, 1), engine or FakeEngine(4096)
    for step in steps:
        saver.save(engine, step, {"data": {"step": step}})
    return saver


def test_the_meta_file_carries_a_manifest_of_every_file(tmp_path):
    saver = saved(tmp_path, 1)
    ref = read_checkpoint(saver.dir, tag_for(1))
    manifest = ref.meta[integrity.MANIFEST_KEY]
    assert sorted(manifest) == [MODEL_FILE, OPTIM_FILE]
    assert manifest[MODEL_FILE]["bytes"] == (ref.path / MODEL_FILE).stat().st_size
    assert len(manifest[OPTIM_FILE]["sha256"]) == 64 and saver.problems(ref) == []


def test_a_truncated_file_is_named_and_auto_falls_back_to_the_older_checkpoint(tmp_path):
    saver = saved(tmp_path, 1, 2)
    damaged = saver.dir / tag_for(2) / MODEL_FILE
    size = damaged.stat().st_size
    damaged.write_bytes(damaged.read_bytes()[:1000])
    ref = find_checkpoint("auto", tmp_path)  # resolve: sizes only, no file read
    assert ref.tag == tag_for(1)
    assert ref.skipped == (f"checkpoint {saver.dir / tag_for(2)} is damaged: {MODEL_FILE} has 1000 "
                           f"bytes, {size} were written",)
    with pytest.raises(ValueError) as error:
        find_checkpoint(str(saver.dir / tag_for(2)), tmp_path)
    assert f"{MODEL_FILE} has 1000 bytes" in str(error.value)
    assert (f"The newest older good checkpoint is {saver.dir / tag_for(1)}: resume from it with "
            f"trainer.resume={saver.dir / tag_for(1)}") in str(error.value)


def test_a_changed_byte_is_caught_by_the_sha256_check_before_loading(tmp_path):
    saver = saved(tmp_path, 1, 2)
    damaged = saver.dir / tag_for(2) / OPTIM_FILE
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))
    ref = find_checkpoint("auto", tmp_path)
    assert ref.tag == tag_for(2)  # same size: the cheap check cannot see it
    with pytest.raises(ValueError, match=f"{OPTIM_FILE} does not match the sha256 recorded when it "
                                         f"was written. The newest older good checkpoint is"):
        saver.verified(ref, fallback=False)
    fallback = saver.verified(ref, fallback=True)
    assert fallback.tag == tag_for(1) and "sha256" in fallback.skipped[0]


def test_a_corrupt_meta_file_is_named_as_corrupt(tmp_path):
    saver = saved(tmp_path, 1, 2)
    meta = saver.dir / tag_for(2) / checkpoint.META_FILE
    meta.write_text('{"step": 2, oops')
    with pytest.raises(ValueError, match=f"{meta} is corrupt \\(not valid JSON: Expecting property "
                                         f"name"):
        find_checkpoint(str(saver.dir / tag_for(2)), tmp_path)
    ref = find_checkpoint("auto", tmp_path)
    assert ref.tag == tag_for(1) and f"{meta} is corrupt" in ref.skipped[0]


def test_nothing_but_damage_left_is_an_error_not_a_fresh_start(tmp_path):
    saver = saved(tmp_path, 1)
    (saver.dir / tag_for(1) / MODEL_FILE).unlink()
    with pytest.raises(ValueError, match=f"{MODEL_FILE} is missing. No older good checkpoint"):
        find_checkpoint("auto", tmp_path)


class DiskFullEngine(FakeEngine):
    """Writes the model file, then fails on the optimizer file like a full disk."""

    def save_checkpoint(self, save_dir, tag, client_state, save_latest=False):
        super().save_checkpoint(save_dir, tag, client_state)
        raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed") \
            from OSError(errno.ENOSPC, "No space left on device")


def test_a_failed_write_names_the_problem_and_loses_nothing(tmp_path):
    saver = saved(tmp_path, 1)
    before = {p: p.read_bytes() for p in (saver.dir / tag_for(1)).iterdir()}
    with pytest.raises(CheckpointWriteError) as error:
        saver.save(DiskFullEngine(4096), 2, {"data": {"step": 2}})
    message = str(error.value)
    assert f"could not write checkpoint {saver.dir / tag_for(2)}" in message
    assert "(No space left on device)" in message and "MiB free on that file system" in message
    assert f"{saver.dir / tag_for(1)} is the newest complete checkpoint" in message
    assert not (saver.dir / tag_for(2)).exists()  # never committed: removed, space freed
    assert checkpoint.latest_tag(saver.dir) == tag_for(1)
    assert {p: p.read_bytes() for p in (saver.dir / tag_for(1)).iterdir()} == before


def test_a_branch_sets_the_newer_checkpoints_aside_and_repoints_latest(tmp_path):
    saver = saved(tmp_path, 2, 4, 6)
    record = branching.start_branch(saver.dir, read_checkpoint(saver.dir, tag_for(2)), "test")
    moved_to = saver.dir / branching.ABANDONED_DIR / "001_after_step_0000002"
    assert record == {"event": "branch", "step": 2, "checkpoint_step": 2, "checkpoint": tag_for(2),
                      "reason": "test", "abandoned": [tag_for(4), tag_for(6)], "moved_to": str(moved_to)}
    assert sorted(p.name for p in moved_to.iterdir()) == [tag_for(4), tag_for(6)]
    assert checkpoint.latest_tag(saver.dir) == tag_for(2) and find_checkpoint("auto", tmp_path).tag == tag_for(2)
    saver.save(FakeEngine(4096), 3, {"data": {"step": 3}})  # the new branch: pruning never sees them
    assert sorted(checkpoint.complete_tags(saver.dir)) == [tag_for(2), tag_for(3)]


def test_a_branch_cut_short_is_completed_by_the_next_resume(tmp_path):
    saver = saved(tmp_path, 2, 4)
    checkpoint.atomic_write(saver.dir / checkpoint.LATEST_FILE, tag_for(2))  # killed before the move
    ref = find_checkpoint("auto", tmp_path)
    assert ref.tag == tag_for(2)
    record = branching.start_branch(saver.dir, ref, "resume")
    assert record["abandoned"] == [tag_for(4)] and not (saver.dir / tag_for(4)).exists()
    assert branching.start_branch(saver.dir, ref, "again") is None  # nothing newer is left


def test_metrics_keep_one_trajectory_and_torn_lines_are_kept_aside(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "train/loss": s}) + "\n" for s in (1, 2, 3)) + '{"step": 4, "tr')
    assert trim_metrics(path, 2) == 2
    assert (tmp_path / "metrics.discarded.jsonl").read_text().splitlines()[-1] == '{"step": 4, "tr'
    logger = RunLogger(tmp_path, LoggerConfig(mode=WandbMode.disabled, progress_bar=False), {})
    logger.start(10, 2)
    logger.log_metrics(3, {"train/loss": 0.5})
    logger.event({"event": "rollback", "step": 3, "checkpoint_step": 1, "reason": "test"})
    logger.close()
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 3] and records[1]["event"] == "rollback"
    assert records[1]["discarded_records"] == 2  # steps 2 and 3 moved aside
