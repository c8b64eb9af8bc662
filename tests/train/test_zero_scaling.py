"""Four data-parallel ranks under ZeRO-3 with FP8 layers: they train what one rank trains on the
same global batch, checkpoints resume exactly, and a checkpoint is never handed to DeepSpeed at
a world size it cannot load.

ZeRO-3 partitions the parameters themselves, so every forward gathers each FP8 layer's weight,
and its checkpoint holds one parameter and optimizer partition per rank next to the FP8 scaling
buffers (amax histories, scales) of the module state. A resumed run must continue bit for bit:
same partitions, same delayed scales, same data position. Loading those partitions at another
world size is refused by DeepSpeed with a raw traceback deep in engine start-up, for every
ZeRO stage >= 1; the trainer now says so before any work (engine.check_resume_world_size).
"""

from __future__ import annotations

import pytest

from fp8train.train.engine import check_resume_world_size
from tests.train.helpers import check_ok, launch, metrics, output


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_checkpoint_at_another_world_size_is_refused(stage):
    with pytest.raises(ValueError, match=rf"ZeRO-{stage} partitions written by 4 ranks, but this "
                                         r"launch has 2.*Relaunch with 4 ranks.*trainer.resume=none"):
        check_resume_world_size("runs/x/checkpoints/step_0000002", 4, stage, 2)


@pytest.mark.parametrize("saved,stage,now", [(4, 0, 2), (4, 3, 4), (None, 3, 2)])
def test_resumable_world_sizes_pass(saved, stage, now):
    check_resume_world_size("ckpt", saved, stage, now)  # stage 0, same size, or unknown size


# 4 ranks of the tiny model: one micro-batch of 1 sequence per rank per step.
FOUR = ("+recipe=hybrid", "deepspeed.zero_stage=3", "trainer.micro_batch_size=1",
        "trainer.global_batch_size=4", "trainer.eval_every=100", "trainer.save_every=2")


@pytest.mark.slow
def test_four_rank_zero3_fp8_tracks_one_rank_resumes_exactly_and_refuses_other_sizes(tmp_path):
    first, resumed, single = tmp_path / "first", tmp_path / "resumed", tmp_path / "single"
    check_ok(launch(first, *FOUR, "trainer.max_steps=3", nproc=4))
    # the same global batch on one rank (4 accumulation steps, ZeRO-1): the same training
    check_ok(launch(single, *FOUR, "deepspeed.zero_stage=1", "trainer.max_steps=3", nproc=1))
    one, four = metrics(single), metrics(first)
    assert four[1]["train/loss"] == pytest.approx(one[1]["train/loss"], rel=1e-6)  # same weights
    for step in (2, 3):  # delayed scaling from scale 1 (see test_data_parallel_equivalence.py)
        assert four[step]["train/loss"] == pytest.approx(one[step]["train/loss"], rel=1e-2), step

    step2 = first / "checkpoints" / "step_0000002"
    check_ok(launch(resumed, *FOUR, "trainer.max_steps=3", f"trainer.resume={step2}", nproc=4))
    assert sorted(metrics(resumed)) == [3]
    # delayed FP8 scales, ZeRO-3 partitions and data position all restored: the same step 3
    assert metrics(resumed)[3]["train/loss"] == metrics(first)[3]["train/loss"]

    refused = launch(tmp_path / "two", *FOUR, "trainer.global_batch_size=2", "trainer.max_steps=3",
                     f"trainer.resume={step2}", nproc=2)
    assert refused.returncode != 0
    text = output(refused)
    assert "ZeRO-3 partitions written by 4 ranks, but this launch has 2" in text, text[-3000:]
    assert "ZeRORuntimeException" not in text  # refused before DeepSpeed started
    assert (step2 / "fp8train_meta.json").is_file()  # nothing already written is lost
