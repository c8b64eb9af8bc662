"""benchmarks/qat_smollm2.py without SmolLM2: the recovery arithmetic on hand-made numbers, and the
whole script on its --tiny random model (a few seconds)."""

import json

import numpy as np
import pytest
import torch

from benchmarks.qat_smollm2 import main, summary, train_batches
from fp8train.ptq import ArrayTokens

TINY = ["--tiny", "--steps", "2", "--batch", "1", "--seq-len", "32", "--eval-len", "32", "--eval-windows", "2",
        "--warmup", "1"]


def test_recovery_is_qat_recoverys_definition_plus_the_untouched_share():
    results = {"untouched": {"ppl": 10.0, "rtn_ppl": 14.0}, "plain": {"ppl": 9.0, "rtn_ppl": 13.0},
               "qat": {"ppl": 9.2, "rtn_ppl": 10.0}}
    rec, text = summary(results, "w4_g64", {"model": "hand-made"})
    assert rec["gap_ppl"] == pytest.approx(4.0)
    assert rec["recovered"] == pytest.approx(0.75)               # (13 - 10) / (13 - 9)
    assert rec["recovered_vs_untouched"] == pytest.approx(1.0)   # (14 - 10) / (14 - 10)
    assert "75.0%" in text and "| qat | 9.2000 | 10.0000 | +0.8000 |" in text


def test_training_windows_follow_the_seed_and_a_short_text_is_named():
    tokens = ArrayTokens(np.arange(100), "text")
    first, again = train_batches(tokens, 3, 2, 8, seed=1), train_batches(tokens, 3, 2, 8, seed=1)
    assert first.shape == (3, 2, 9) and torch.equal(first, again)
    assert torch.equal(first[..., 1:] - first[..., :-1], torch.ones(3, 2, 8, dtype=torch.int64))  # contiguous
    assert not torch.equal(first, train_batches(tokens, 3, 2, 8, seed=2))
    with pytest.raises(ValueError, match="--seq-len"):
        train_batches(tokens, 1, 1, 100, seed=0)


def test_lr_zero_leaves_both_arms_at_the_untouched_model(tmp_path):
    report = main([*TINY, "--out", str(tmp_path), "--lr", "0"])
    res = report["results"]
    for arm in ("plain", "qat"):
        assert (res[arm]["ppl"], res[arm]["rtn_ppl"]) == (res["untouched"]["ppl"], res["untouched"]["rtn_ppl"])
    assert res["untouched"]["rtn_ppl"] != res["untouched"]["ppl"]     # random weights: W4 costs something
    assert report["recovery"]["recovered"] == 0.0
    # same batches, same weights: only the qat arm's fake-quantized forward differs
    assert res["qat"]["train_loss"][0] != res["plain"]["train_loss"][0]
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk["recovery"] == report["recovery"] and (tmp_path / "train_loss.png").stat().st_size > 0
    assert "| plain |" in (tmp_path / "report.md").read_text()


def test_bad_arguments_name_the_flag(tmp_path):
    with pytest.raises(ValueError, match="--steps=0"):
        main([*TINY, "--out", str(tmp_path), "--steps", "0"])
