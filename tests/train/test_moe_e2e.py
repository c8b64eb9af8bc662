"""The tiny DeepSeek-style MoE trains through the same launch command, recipes and DeepSpeed engine
(2 gloo ranks, emulated FP8): its experts run the FP8 grouped GEMMs and it logs expert load."""

from __future__ import annotations

import pytest

from tests.train.helpers import check_ok, launch, metrics, output, summary

pytestmark = pytest.mark.slow


def test_moe_tiny_trains_with_v3_fp8_on_two_ranks(tmp_path):
    result = check_ok(launch(tmp_path, "+recipe=v3_fp8", "model.size=moe_tiny", "trainer.max_steps=12",
                             "trainer.eval_every=12", "trainer.fp8_telemetry_every=4", nproc=2))
    records = metrics(tmp_path)
    assert records[12]["train/loss"] < records[1]["train/loss"] - 0.5, (records[1], records[12])
    assert "moe/load_max_over_mean" in records[12] and records[12]["moe/dropped_frac"] == 0.0
    experts = [k for k in records[4] if k.startswith("fp8/") and ".experts." in k]
    assert experts, "no FP8 telemetry from the routed experts' grouped GEMMs"
    assert "router" in output(result)  # the conversion report says the router stayed high precision
    assert summary(tmp_path)["world_size"] == 2
