"""+qat=<preset> through the real entry point: a bad group size stops the run before any work, a
QAT fine-tune resumes from a checkpoint trained without QAT (no new state), and says so."""

from __future__ import annotations

import pytest

from fp8train.sweep.run_model import load_run_model, validation_loss
from tests.train.helpers import check_ok, launch, output, summary

pytestmark = pytest.mark.slow


def test_qat_fine_tune_from_a_plain_checkpoint(tmp_path):
    bad = launch(tmp_path / "bad", "+recipe=bf16", "+qat=w4_g128", "qat.weight.group_size=96", "trainer.max_steps=2")
    assert bad.returncode == 2
    assert "+qat=w4_g128: layers.0.attn.q_proj.weight: inner dimension" in output(bad)
    assert "128 is not a multiple of 96" in output(bad)
    assert not (tmp_path / "bad" / "checkpoints").exists()

    base = tmp_path / "base"
    check_ok(launch(base, "+recipe=bf16", "trainer.max_steps=2"))
    tuned = tmp_path / "qat"
    result = check_ok(launch(tuned, "+recipe=bf16", "+qat=w4_g128", "trainer.max_steps=3",
                             f"trainer.resume={base / 'checkpoints'}"))
    assert "QAT preset 'w4_g128': fake-quantized 14 layer(s), skipped 1" in output(result)
    assert "resumed from" in output(result)
    done = summary(tuned)
    assert done["qat"] == "w4_g128" and done["steps"] == 3 and done["final_val_loss"] is not None
    assert summary(base)["qat"] is None

    # the run's final weights back in memory (FP32, no FP8) give the trainer's validation loss
    model, cfg = load_run_model(tuned)
    loss = validation_loss(model, cfg, max_batches=cfg["data"]["val_batches"])  # the trainer's val batches
    assert loss == pytest.approx(done["final_val_loss"], rel=2e-2)  # BF16 engine vs FP32 here
