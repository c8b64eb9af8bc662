"""The compare command on synthetic sweeps whose table values are known exactly."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.image
import pytest
import yaml

from fp8train.sweep.compare import compare, main, moving_average, relative_gap
from fp8train.sweep.runs import CompareError, find_runs


def write_run(run_dir: Path, recipe: str, train: list[float], val: dict[int, float],
              overrides: list[str] | None = None, tokens_per_s: float | None = 1000.0,
              finished: bool = True) -> Path:
    """A run folder as the trainer writes it: metrics.jsonl, .hydra/<launch>/, summary.json."""
    run_dir.mkdir(parents=True)
    lines = []
    for step, loss in enumerate(train, start=1):
        record = {"step": step, "tokens": 64 * step, "train/loss": loss, "train/tokens_per_s": 900.0}
        if step in val:
            record.update({"val/loss": val[step], "val/ppl": 2.718 ** val[step]})
        lines.append(json.dumps(record))
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    launch = run_dir / ".hydra" / "20260101-000000-pid1"
    launch.mkdir(parents=True)
    (launch / "config.yaml").write_text(yaml.safe_dump({"recipe": {"name": recipe}, "trainer": {}}))
    (launch / "overrides.yaml").write_text(yaml.safe_dump(overrides or [f"+recipe={recipe}"]))
    if finished:
        (run_dir / "summary.json").write_text(json.dumps(
            {"recipe": recipe, "tokens_per_s": tokens_per_s, "preempted": False}))
    return run_dir


def table_rows(path: Path) -> dict[str, list[str]]:
    """compare.md rows keyed by their first cell."""
    rows = [line.strip("|").split("|") for line in path.read_text().splitlines()
            if line.startswith("| ") and not line.startswith("| recipe")]
    return {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in rows}


@pytest.fixture
def sweep(tmp_path) -> Path:
    """bf16 flat at 2.0; v3_fp8 1 % above it; hybrid 2 % above, and only half as fast."""
    steps = 20
    write_run(tmp_path / "0_bf16", "bf16", [2.0] * steps, {10: 2.0, 20: 2.0})
    write_run(tmp_path / "1_v3_fp8", "v3_fp8", [2.02] * steps, {10: 2.02, 20: 2.02}, tokens_per_s=1500.0)
    write_run(tmp_path / "2_hybrid", "hybrid", [2.04] * steps, {10: 2.04, 20: 2.04}, tokens_per_s=500.0)
    return tmp_path


def test_table_values_and_plots(sweep):
    outputs = compare(sweep)
    rows = table_rows(outputs["table"])
    assert set(rows) == {"bf16", "v3_fp8", "hybrid"}
    # columns: steps, final train, final val, train gap, val gap, tokens/s, status
    assert rows["bf16"] == ["20", "2.0000", "2.0000", "+0.00", "+0.00", "1,000", "finished"]
    assert rows["v3_fp8"][1:5] == ["2.0200", "2.0200", "+1.00", "+1.00"]
    assert rows["hybrid"][3:6] == ["+2.00", "+2.00", "500"]
    for key in ("curves", "gaps"):
        image = matplotlib.image.imread(outputs[key])
        assert image.shape[0] > 100 and image.shape[1] > 100, key
        assert image.std() > 0, f"{key} is a blank image"


def test_gap_uses_last_step_both_runs_reached(tmp_path):
    """A run still going (no summary) is compared at its last step, not the baseline's."""
    write_run(tmp_path / "a", "bf16", [3.0] * 10 + [1.0] * 10, {10: 3.0, 20: 1.0})
    write_run(tmp_path / "b", "v3_fp8", [3.3] * 10, {10: 3.3}, finished=False)
    rows = table_rows(compare(tmp_path, window=1)["table"])
    assert rows["v3_fp8"][3:5] == ["+10.00", "+10.00"]
    assert rows["v3_fp8"][-1] == "running"
    assert rows["v3_fp8"][-2] == "900"  # median logged tokens/s while there is no summary


def test_moving_average_and_gap_math():
    assert moving_average([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert moving_average([4.0], 10) == [4.0]
    steps, gap = relative_gap([1, 2, 3], [1.1, 2.2, 3.3], [2, 3, 4], [2.0, 3.0, 4.0])
    assert steps == [2, 3] and gap == pytest.approx([10.0, 10.0])


def test_pairs_each_run_with_the_baseline_of_its_other_overrides(tmp_path):
    """recipe x lr sweep: v3_fp8 at lr=0.1 compares with bf16 at lr=0.1, not lr=0.2."""
    for lr, base in (("0.1", 2.0), ("0.2", 4.0)):
        write_run(tmp_path / f"bf16_{lr}", "bf16", [base] * 5, {5: base}, ["+recipe=bf16", f"optim.lr={lr}"])
        write_run(tmp_path / f"fp8_{lr}", "v3_fp8", [base * 1.05] * 5, {5: base * 1.05},
                  ["+recipe=v3_fp8", f"optim.lr={lr}"])
    rows = table_rows(compare(tmp_path, window=1)["table"])
    assert rows["v3_fp8 (fp8_0.1)"][3] == "+5.00"
    assert rows["v3_fp8 (fp8_0.2)"][3] == "+5.00"


def test_resumed_metrics_keep_the_last_record_and_tolerate_a_partial_last_line(tmp_path):
    run = write_run(tmp_path / "r", "bf16", [5.0, 4.0, 3.0], {})
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 3, "train/loss": 2.5}) + "\n" + '{"step": 4, "train/lo')
    [loaded] = find_runs(tmp_path)
    assert loaded.steps == [1, 2, 3] and loaded.train_loss == [5.0, 4.0, 2.5]


def test_corrupt_line_in_the_middle_is_an_error(tmp_path):
    run = write_run(tmp_path / "r", "bf16", [5.0, 4.0], {})
    (run / "metrics.jsonl").write_text('{"step": 1, "train/loss": 5}\nnot json\n{"step": 2, "train/loss": 4}\n')
    with pytest.raises(CompareError, match=r"metrics.jsonl:2 is not JSON"):
        find_runs(tmp_path)


def test_recipe_from_hydra_record_when_no_summary(tmp_path):
    write_run(tmp_path / "x", "blockwise", [1.0], {}, finished=False)
    [run] = find_runs(tmp_path)
    assert run.recipe == "blockwise" and run.status == "running" and run.tokens_per_s == 900.0


def test_ignores_checkpoint_and_wandb_folders(tmp_path):
    write_run(tmp_path / "run", "bf16", [1.0], {})
    write_run(tmp_path / "run" / "wandb" / "copy", "bf16", [1.0], {})
    assert [r.path.name for r in find_runs(tmp_path)] == ["run"]


def test_no_runs_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "empty_job").mkdir()
    with pytest.raises(CompareError, match="no runs under"):
        compare(tmp_path)
    assert main([str(tmp_path)]) == 2
    assert "no runs under" in capsys.readouterr().err
    assert main([str(tmp_path / "missing")]) == 2
    assert "is not a directory" in capsys.readouterr().err


def test_missing_baseline_names_the_recipes_found(sweep, capsys):
    assert main([str(sweep), "--baseline", "fp32"]) == 2
    err = capsys.readouterr().err
    assert "no 'fp32' run" in err and "'hybrid'" in err and "--baseline" in err


def test_other_baseline_and_out_dir(sweep, tmp_path, capsys):
    out = tmp_path / "report"
    assert main([str(sweep), "--baseline", "v3_fp8", "--out", str(out), "--window", "3"]) == 0
    rows = table_rows(out / "compare.md")
    assert rows["bf16"][4] == "-0.99"  # (2.0 - 2.02) / 2.02
    assert (out / "loss_curves.png").is_file() and (out / "loss_gap.png").is_file()
    assert "v3_fp8" in capsys.readouterr().out


def test_window_must_be_positive(sweep):
    with pytest.raises(CompareError, match="--window 0"):
        compare(sweep, window=0)


def test_event_records_are_skipped_and_a_branch_keeps_one_trajectory(tmp_path):
    """metrics.jsonl edited by hand (the trainer moves abandoned records aside itself): records
    past a branch's checkpoint_step that precede the event are dropped; events are not steps."""
    run = write_run(tmp_path / "0_bf16", "bf16", [3.0, 2.9, 2.8, 2.7], {})
    with open(run / "metrics.jsonl", "a") as handle:
        handle.write(json.dumps({"event": "branch", "step": 2, "checkpoint_step": 2}) + "\n")
        handle.write(json.dumps({"step": 3, "train/loss": 2.5}) + "\n")
        handle.write(json.dumps({"event": "rollback", "step": 5, "checkpoint_step": 3}) + "\n")
        handle.write(json.dumps({"step": 6, "train/loss": 2.4}) + "\n")
    (loaded,) = find_runs(tmp_path)
    assert loaded.steps == [1, 2, 3, 6] and loaded.train_loss == [3.0, 2.9, 2.5, 2.4]


def test_a_diverged_run_says_so(tmp_path):
    run = write_run(tmp_path / "0_bf16", "bf16", [3.0, float("nan")], {})
    (run / "summary.json").write_text(json.dumps({"recipe": "bf16", "diverged": True, "preempted": False}))
    assert find_runs(tmp_path)[0].status == "diverged"
