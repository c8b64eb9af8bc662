"""scripts/gpu/multinode_check.py: the checks on a preempted-and-resumed multi-node run, and --fp8,
which fails a run that trained no FP8 layer (the session-7 job did: the speed policy kept 125M in BF16)."""

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu" / "multinode_check.py"
spec = importlib.util.spec_from_file_location("multinode_check", SCRIPT)
multinode_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(multinode_check)

STEPS, WORLD = 8, 4


def fake_run(root: Path, name: str, fp8_layers: int, stop: int | None) -> Path:
    run = root / name
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "train/loss": 5.0 - 0.1 * s}) + "\n"
                                               for s in range(1, STEPS + 1)))
    (run / "summary.json").write_text(json.dumps({"steps": STEPS, "world_size": WORLD, "preempted": False,
                                                  "final_train_loss": 4.2, "fp8_layers": fp8_layers}))
    log = [f"FP8 recipe 'hybrid': converted {fp8_layers} layer(s), skipped 1"]
    if stop is not None:
        log += [f"stopped by signal 10 at step {stop}; checkpoint saved",
                f"resumed from /x/checkpoints/step_{stop:07d} at step {stop}"]
    (run / "train.rank0.log").write_text("\n".join(log) + "\n")
    return run


def test_a_resumed_fp8_run_passes_and_the_table_counts_its_layers(tmp_path, capsys):
    slurm = fake_run(tmp_path, "slurm", fp8_layers=84, stop=3)
    ref = fake_run(tmp_path, "ref", fp8_layers=84, stop=None)
    rc = multinode_check.main(["--steps", str(STEPS), "--world-size", str(WORLD), "--preempted", "slurm",
                               "--fp8", "--reference", str(ref), f"slurm={slurm}"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "converted 84 layer(s)" in out and "| slurm | 4 | 3 | 3 | 8 | 4.2 | 84 |" in out


def test_fp8_fails_a_run_that_trained_no_fp8_layer(tmp_path, capsys):
    slurm = fake_run(tmp_path, "slurm", fp8_layers=0, stop=3)
    argv = ["--steps", str(STEPS), "--world-size", str(WORLD), "--preempted", "slurm", f"slurm={slurm}"]
    assert multinode_check.main(argv) == 0  # without --fp8 the mechanics alone pass
    assert multinode_check.main(argv + ["--fp8"]) == 1
    assert "fp8_layers=0: no layer trained in FP8" in capsys.readouterr().out
