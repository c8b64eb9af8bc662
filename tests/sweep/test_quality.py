"""The loss-gap study command: planning, resuming, and the report on synthetic run folders whose
gaps are known; one slow end-to-end study of the real trainer at toy size."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import matplotlib.image
import pytest

from fp8train.sweep import quality
from fp8train.sweep.run_pool import Job, run_jobs
from tests.sweep.test_compare import write_run


def finished_run(run_dir: Path, recipe: str, val: dict[int, float]) -> None:
    write_run(run_dir, recipe, [val[max(val)]] * max(val), val)
    summary = json.loads((run_dir / "summary.json").read_text())
    (run_dir / "summary.json").write_text(json.dumps({**summary, "final_val_loss": val[max(val)]}))


@pytest.fixture
def study(tmp_path) -> Path:
    """bf16 seeds at 2.0 / 2.2; fp8 exactly +1 % and +3 % above them at the end."""
    plan = {"recipes": {"bf16": ["+recipe=bf16"], "fp8": ["+recipe=v3_fp8"]}, "seeds": [1, 2],
            "common": ["trainer.max_steps=20"], "baseline": "bf16"}
    (tmp_path / quality.STUDY_FILE).write_text(json.dumps(plan))
    for seed, base in ((1, 2.0), (2, 2.2)):
        finished_run(tmp_path / "bf16" / f"seed{seed}", "bf16", {10: base + 0.1, 20: base})
        scale = 1.01 if seed == 1 else 1.03
        finished_run(tmp_path / "fp8" / f"seed{seed}", "fp8", {10: base + 0.1, 20: base * scale})
    return tmp_path


def test_report_only_table_json_and_plot(study, capsys):
    assert quality.main(["--out", str(study), "--report-only"]) == 0
    result = json.loads((study / "quality.json").read_text())
    gap = result["recipes"]["fp8"]["gap"]
    assert gap["per_seed"] == pytest.approx([1.0, 3.0])
    assert gap["mean"] == pytest.approx(2.0)
    assert gap["ci_low"] < 0 < gap["ci_high"]  # two seeds: t = 12.7
    assert result["baseline_seed_sd_pct"] == pytest.approx(100 * 0.02 ** 0.5 / 2.1)  # sd(2.0, 2.2) / mean
    table = (study / "quality.md").read_text()
    assert "| fp8 | 2 |" in table and "+2.000" in table and "+1.00, +3.00" in table
    assert "paired by seed" in table and "Student-t" in table
    assert matplotlib.image.imread(study / "loss_gap.png").std() > 0
    assert "fp8" in capsys.readouterr().out


def test_fp8_layers_column_and_a_study_without_fp8_layers_is_flagged(study):
    """Session 7's GPU study ran its FP8 recipes with 0 FP8 layers (the speed policy's choice at
    125M): the table shows the count per recipe and warns when an FP8 recipe ran none."""
    def set_layers(recipe: str, layers: int) -> None:
        for seed in (1, 2):
            path = study / recipe / f"seed{seed}" / "summary.json"
            path.write_text(json.dumps({**json.loads(path.read_text()), "fp8_layers": layers}))

    set_layers("bf16", 0)
    set_layers("fp8", 84)
    assert quality.main(["--out", str(study), "--report-only"]) == 0
    table = (study / "quality.md").read_text()
    assert "| FP8 layers |" in table and "+1.00, +3.00 | 84 |" in table and "Warning" not in table
    set_layers("fp8", 0)
    assert quality.main(["--out", str(study), "--report-only"]) == 0
    table = (study / "quality.md").read_text()
    assert "**Warning: fp8 ran no FP8 layer**" in table and "bf16 ran no" not in table
    assert json.loads((study / "quality.json").read_text())["recipes"]["fp8"]["fp8_layers"] == [0]


def test_plan_turns_the_speed_policy_off_and_an_override_wins(tmp_path, capsys):
    argv = ["--out", str(tmp_path), "--seeds", "1", "--dry-run", "--", "trainer.precision_policy=table"]
    assert quality.main(argv) == 0
    for line in capsys.readouterr().out.strip().splitlines():
        words = line.split()
        assert words.index("trainer.precision_policy=off") < words.index("trainer.precision_policy=table")


def test_missing_baseline_and_bad_input_are_clear_errors(study, tmp_path, capsys):
    for seed in (1, 2):
        (study / "bf16" / f"seed{seed}" / "summary.json").unlink()
    assert quality.main(["--out", str(study), "--report-only"]) == 2
    assert "no finished 'bf16' run" in capsys.readouterr().err
    assert quality.main(["--out", str(tmp_path / "new"), "--recipes", "v3_fp8", "--dry-run"]) == 2
    assert "--baseline 'bf16' is not among the recipes" in capsys.readouterr().err
    assert quality.main(["--out", str(tmp_path / "new"), "--variant", "oops", "--dry-run"]) == 2
    assert "LABEL='OVERRIDES'" in capsys.readouterr().err
    assert quality.main(["--out", str(tmp_path / "new"), "--recipes", "bf16,v9", "--dry-run"]) == 2
    assert "--recipes: no preset ['v9']" in capsys.readouterr().err
    assert quality.main(["--out", str(tmp_path / "none"), "--report-only"]) == 2
    assert "run the study first" in capsys.readouterr().err


def test_plan_and_dry_run(tmp_path, capsys):
    argv = ["--out", str(tmp_path), "--seeds", "3,4", "--variant", "v3c=+recipe=v3_fp8 recipe.input.scaling=current",
            "--dry-run", "--", "trainer.max_steps=7"]
    assert quality.main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 6  # (bf16, v3_fp8, v3c) x 2 seeds
    v3c = [line for line in lines if "recipe.name=v3c" in line]
    assert len(v3c) == 2 and all("recipe.input.scaling=current" in line for line in v3c)
    assert [line.split()[-1] for line in v3c] == [f"hydra.run.dir={tmp_path}/v3c/seed{s}" for s in (3, 4)]
    assert "trainer.seed=3" in lines[2] and "trainer.seed=4 trainer.max_steps=7" in lines[3]  # seed-major
    assert not (tmp_path / quality.STUDY_FILE).exists()  # a dry run writes nothing


class ScriptJob(Job):
    """A job whose command is a tiny Python script instead of the trainer (pool logic only)."""

    script = ""

    def command(self) -> list[str]:
        return [sys.executable, "-c", self.script, str(self.run_dir)]


def test_pool_runs_slots_in_parallel_skips_finished_and_reports_failures(tmp_path):
    done = Job("bf16", 1, [], tmp_path / "bf16" / "seed1")
    finished_run(done.run_dir, "bf16", {5: 2.0})
    jobs = [done]
    for seed in (1, 2):  # both sleep 1.5 s: with two slots they overlap
        job = ScriptJob("ok", seed, [], tmp_path / "ok" / f"seed{seed}")
        job.script = "import sys, time, pathlib; time.sleep(1.5); print('hello'); pathlib.Path(sys.argv[1]).mkdir()"
        jobs.append(job)
    bad = ScriptJob("bad", 1, [], tmp_path / "bad" / "seed1")
    bad.script = "import sys; print('no_such_recipe'); sys.exit(3)"
    jobs.append(bad)
    lines: list[str] = []
    started = time.perf_counter()
    run_jobs(jobs, [None, None], echo=lines.append, poll_s=0.05)
    assert time.perf_counter() - started < 2 * 1.5 + 1.0  # the two sleepers overlapped
    assert done.skipped and done.returncode == 0 and done.seconds == 0
    assert [j.returncode for j in jobs[1:3]] == [0, 0] and all(j.run_dir.is_dir() for j in jobs[1:3])
    assert "hello" in jobs[1].log_path.read_text()
    assert bad.returncode == 3 and "no_such_recipe" in bad.log_path.read_text()
    assert sum("FAILED" in line for line in lines) == 1 and sum("start" in line for line in lines) == 3


def test_pool_deadline_stops_running_jobs_and_starts_no_more(tmp_path):
    """At the deadline the running job gets SIGTERM (the trainer checkpoints on it) and the
    pending one is left for the next call."""
    slow = ScriptJob("slow", 1, [], tmp_path / "slow" / "seed1")
    slow.script = ("import signal, sys, time, pathlib\n"
                   "signal.signal(signal.SIGTERM, lambda *a: (pathlib.Path(sys.argv[1]).mkdir(), sys.exit(0)))\n"
                   "print('ready', flush=True)\ntime.sleep(60)")
    later = ScriptJob("later", 1, [], tmp_path / "later" / "seed1")
    later.script = "print('should not run')"
    lines: list[str] = []
    started = time.perf_counter()
    run_jobs([slow, later], [None], echo=lines.append, poll_s=0.05, deadline_s=4.0)  # > its startup
    assert time.perf_counter() - started < 30
    assert slow.run_dir.is_dir() and slow.returncode == 0  # it saw SIGTERM and exited cleanly
    assert later.returncode is None and not later.log_path.exists()
    assert any("deadline" in line for line in lines) and any("next call resumes" in line for line in lines)


@pytest.mark.slow
def test_toy_study_end_to_end(tmp_path, capsys):
    """2 recipes x 2 seeds x 6 steps of the tiny model through launch/train.py, then the report."""
    toy = ["logger.mode=disabled", "data.seq_len=32", "trainer.micro_batch_size=4", "trainer.global_batch_size=4",
           "data.val_batch_size=4", "data.val_batches=2", "optim.warmup_steps=2", "trainer.max_steps=6",
           "trainer.eval_every=3", "trainer.save_every=100"]
    argv = ["--out", str(tmp_path), "--recipes", "bf16,current", "--seeds", "1,2", "--gpus", "none", "--", *toy]
    assert quality.main(argv) == 0
    result = json.loads((tmp_path / "quality.json").read_text())
    assert result["recipes"]["bf16"]["seeds"] == [1, 2] and result["recipes"]["current"]["seeds"] == [1, 2]
    gap = result["recipes"]["current"]["gap"]
    assert gap["ci_low"] is not None and abs(gap["mean"]) < 5.0  # FP8 tracks BF16 at 6 steps
    assert set(result["curves"]["current"]["1"]) == {"3", "6"}
    assert result["recipes"]["bf16"]["fp8_layers"] == [0] and result["recipes"]["current"]["fp8_layers"][0] > 0
    assert matplotlib.image.imread(tmp_path / "loss_gap.png").std() > 0
    capsys.readouterr()
    assert quality.main(argv) == 0  # a second call finds every run finished and only reports
    assert capsys.readouterr().out.count("already finished") == 4
