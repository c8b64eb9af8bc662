"""The FP8 health guard through the real entry point: act mode promotes layers (logged, in
summary.json, in the checkpoint), a resumed run rebuilds them before loading weights, warn mode
changes nothing, and bad settings stop the run before any work."""

from __future__ import annotations

import json

import pytest

from fp8train.sweep.fp8_probe import probe_run
from tests.train.helpers import check_ok, launch, output, summary

pytestmark = pytest.mark.slow

# every nonzero flushed to zero counts: the first checks promote layers for sure
FORCED = ("+recipe=v3_fp8", "trainer.fp8_telemetry_every=1", "trainer.fp8_guard.max_underflow=0.0",
          "trainer.fp8_guard.patience=1", "trainer.save_every=2")


def test_act_promotes_checkpoints_and_resumes(tmp_path):
    run = tmp_path / "act"
    first = check_ok(launch(run, *FORCED, "trainer.fp8_guard.mode=act", "trainer.max_steps=2"))
    assert "fp8 guard: promoted step 1: layers.0.attn.q_proj -> current (grad_output underflow" in output(first)
    promotions = summary(run)["fp8_guard"]["promotions"]
    assert {(p["step"], p["promotion"]) for p in promotions} >= {(1, "current"), (2, "blockwise")}
    saved = json.loads((run / "checkpoints" / "step_0000002" / "fp8_guard.json").read_text())
    assert saved["promotions"] == promotions

    resumed = check_ok(launch(run, *FORCED, "trainer.fp8_guard.mode=act", "trainer.max_steps=3"))
    assert "fp8 guard: restored promotion of layers.0.attn.q_proj -> current (step 1)" in output(resumed)
    assert "resumed from" in output(resumed)
    assert summary(run)["fp8_guard"]["promotions"][:len(promotions)] == promotions

    # the probe rebuilds the run as it trained: promotions replayed, FP8 state loaded strictly
    layers = probe_run(run, batches=1)
    high_precision = {p["layer"] for p in summary(run)["fp8_guard"]["promotions"] if p["promotion"] == "bf16"}
    assert high_precision and not high_precision & set(layers)  # promoted to BF16: no FP8 casts left
    assert all(0 < stats["sqnr_db"] for roles in layers.values() for stats in roles.values())


def test_warn_only_and_bad_settings(tmp_path):
    warn = tmp_path / "warn"
    result = check_ok(launch(warn, *FORCED, "trainer.fp8_guard.mode=warn", "trainer.max_steps=1"))
    assert "fp8 guard (warn only, trainer.fp8_guard.mode=act promotes)" in output(result)
    guard = summary(warn)["fp8_guard"]
    assert guard["promotions"] == [] and guard["warnings"] and guard["mode"] == "warn"

    bad = launch(tmp_path / "bad", "+recipe=v3_fp8", "trainer.fp8_guard.mode=act", "trainer.fp8_telemetry_every=0")
    assert bad.returncode == 2 and "trainer.fp8_telemetry_every=0 collects none" in output(bad)
    bad = launch(tmp_path / "bad2", "+recipe=v3_fp8", "trainer.fp8_guard.mode=act", "trainer.fp8_guard.patience=0")
    assert bad.returncode == 2 and "fp8_guard.patience=0 must be an integer >= 1" in output(bad)
    bad = launch(tmp_path / "bad3", "trainer.fp8_guard.mode=loud")
    assert bad.returncode != 0 and "loud" in output(bad)
