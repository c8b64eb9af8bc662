"""The study's telemetry table from run folders whose logged FP8 telemetry is known."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fp8train.sweep import gap_telemetry
from fp8train.sweep.run_pool import Job


def write_run(run_dir: Path, rows: list[dict], finished: bool = True) -> None:
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    if finished:
        (run_dir / "summary.json").write_text(json.dumps({"preempted": False}))


def telemetry_row(step: int, sqnr: dict[str, float], underflow: float) -> dict:
    """Layer c underflows twice as much as the others."""
    row = {"step": step, "train/loss": 1.0}
    for layer, value in sqnr.items():
        row[f"fp8/{layer}/grad_output/sqnr_db"] = value
        row[f"fp8/{layer}/grad_output/underflow"] = underflow * (2 if layer == "c" else 1)
        row[f"fp8/{layer}/grad_output/saturated"] = 0.0
    return row


def test_tail_average_then_median_and_worst_over_layers(tmp_path):
    jobs = []
    for seed, offset in ((1, 0.0), (2, 2.0)):
        rows = [telemetry_row(100, {"a": 0.0, "b": 0.0, "c": 0.0}, 0.9),  # early: outside the last third
                telemetry_row(250, {"a": 30.0 + offset, "b": 20.0 + offset, "c": 25.0 + offset}, 0.1),
                {"step": 280, "train/loss": 0.5},
                telemetry_row(300, {"a": 32.0 + offset, "b": 22.0 + offset, "c": 27.0 + offset}, 0.3)]
        write_run(tmp_path / "fp8" / f"seed{seed}", rows)
        jobs.append(Job("fp8", seed, [], tmp_path / "fp8" / f"seed{seed}"))
    write_run(tmp_path / "fp8" / "seed3", [telemetry_row(300, {"a": -99.0}, 1.0)], finished=False)
    jobs.append(Job("fp8", 3, [], tmp_path / "fp8" / "seed3"))
    write_run(tmp_path / "bf16" / "seed1", [{"step": 300, "train/loss": 1.0}])
    jobs.append(Job("bf16", 1, [], tmp_path / "bf16" / "seed1"))

    table = gap_telemetry.study_telemetry(jobs)
    assert set(table) == {"fp8"}  # no telemetry -> no row; the unfinished run is not counted
    row = table["fp8"]["grad_output"]
    assert row["runs"] == 2 and row["layers"] == 3
    # layer means over steps 250, 300 and seeds: a 32, b 22, c 27
    assert row["sqnr_db"]["median"] == pytest.approx(27.0)
    assert row["sqnr_db"]["worst"] == pytest.approx(22.0) and row["sqnr_db"]["worst_layer"] == "b"
    assert row["underflow"]["worst"] == pytest.approx(0.4) and row["underflow"]["worst_layer"] == "c"
    text = gap_telemetry.markdown(table, {"fp8": {"grad_output": "e4m3 delayed"}}, 1 / 3)
    assert "| fp8 | grad_output | e4m3 delayed | 3 | 27.0 | 22.0 | 2.0e-01 | 4.0e-01 | c | 0.0e+00 |" in text


def test_preset_formats_names_each_role():
    formats = gap_telemetry.preset_formats(["v3_fp8", "not_a_preset"])
    assert formats == {"v3_fp8": {"input": "e5m2 delayed", "weight": "e4m3 delayed",
                                  "grad_output": "e4m3 delayed"}}
