"""benchmarks/bench_scaling.py's tables: parity runs put every layer in FP8, and both tables say how
many layers a run converted (sessions 6-7 published 125M "hybrid" parity runs that converted none)."""

import json

from benchmarks import bench_scaling
from benchmarks.bench_scaling import Point, parity_points, parity_table, scaling_table


def test_parity_runs_switch_the_speed_policy_off_before_the_preset_overrides():
    spec = {"model": "125m", "recipe": "hybrid", "worlds": [1, 2, 4], "global_batch": 64,
            "overrides": ["optim.decay_steps=100"]}
    points = parity_points(spec, steps=12)
    assert [p.world for p in points] == [1, 2, 4]
    for p in points:
        assert p.kind == "parity"
        assert p.overrides == ("trainer.precision_policy=off", "optim.decay_steps=100")
    # and the command carries it (a preset override, given later, may still set another policy)
    models = {"125m": {"overrides": ["+experiment=gpu_125m"], "micro": 8, "accum": 1}}
    cmd = bench_scaling.command(points[0], models, bench_scaling.REPO / "x", False, [])
    assert cmd.index("trainer.precision_policy=off") < cmd.index("optim.decay_steps=100")


def _run(tmp_path, world, losses, fp8_layers):
    run = tmp_path / f"w{world}"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s + 1, "train/loss": v}) + "\n"
                                               for s, v in enumerate(losses)))
    row = {"name": f"parity_w{world}", "world": world, "model": "125m", "recipe": "hybrid",
           "global_batch": 64, "fp8_layers": fp8_layers}
    return row, run


def test_parity_table_shows_the_fp8_layers_and_warns_when_there_were_none(tmp_path):
    rows, dirs = [], {}
    for world, losses in ((1, [5.0, 4.0]), (2, [5.0, 4.004])):
        row, run = _run(tmp_path, world, losses, fp8_layers=84)
        rows.append(row), dirs.update({row["name"]: run})
    text = parity_table(rows, dirs)
    assert "| FP8 layers |" in text and "| 2 | 5.0000000 | 1.00e-03 (2) | 4.00400 | 84 |" in text
    assert "WARNING" not in text
    for row in rows:
        row["fp8_layers"] = 0
    assert "converted no layer to FP8: this parity check compared BF16 with BF16" in parity_table(rows, dirs)


def test_scaling_table_has_an_fp8_layers_column():
    row = {**vars(Point("1b", "hybrid", 1, 1, 8, 12)), "tokens_per_s_per_gpu": 1000.0, "tokens_per_s": 1000.0,
           "peak_gib": 30.0, "step_ms": 500.0, "amax_ms": 1.0, "amax_collectives": 1, "amax_pct": 0.2,
           "fp8_layers": 48}
    header, rule, line = scaling_table([row]).splitlines()
    assert header.endswith("| FP8 speedup | FP8 layers |") and rule.count("---") == 12
    assert line.endswith("| 48 |")
