"""A local sweep, no Slurm: Hydra's basic launcher runs two short recipes one after another,
then the compare command turns the sweep folder into a table and two plots."""

from __future__ import annotations

import subprocess
import sys

import matplotlib.image
import pytest

from fp8train.sweep.compare import main as compare_main
from tests.slurm.helpers import FAST, LAUNCH, REPO, SWEEP_DIRNAME, assert_finished_run, clean_env

pytestmark = pytest.mark.slow


def test_basic_launcher_sweep_then_compare(tmp_path, capsys):
    sweep, steps = tmp_path / "sweep", 4
    done = subprocess.run([sys.executable, str(LAUNCH), "-m", "+recipe=bf16,v3_fp8", *FAST, SWEEP_DIRNAME,
                           f"trainer.max_steps={steps}", "trainer.eval_every=2", "trainer.save_every=2",
                           f"hydra.sweep.dir={sweep}"],
                          cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    runs = sorted(p.parent for p in sweep.glob("*/summary.json"))
    assert [assert_finished_run(r, steps=steps, world_size=1, eval_every=2)["recipe"] for r in runs] \
        == ["bf16", "v3_fp8"]

    assert compare_main([str(sweep), "--window", "2"]) == 0
    table = (sweep / "compare.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| bf16 ") or line.startswith("| v3_fp8 ")]
    assert len(rows) == 2, table
    assert "| +0.00 | +0.00 |" in rows[0]  # the baseline against itself
    assert "finished" in rows[1] and "n/a" not in rows[1]
    for png in ("loss_curves.png", "loss_gap.png"):
        assert matplotlib.image.imread(sweep / png).std() > 0, png
    assert "v3_fp8" in capsys.readouterr().out
