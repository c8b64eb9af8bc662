"""A Hydra multirun on the real cluster through the submitit launcher (`hydra/launcher=slurm`).

Two sweep points become a 2-job Slurm array; each job runs 2 tasks that form one gloo world
through fp8train.sweep.submitit_env. The sweep is started from a scratch working directory
without hydra.sweep.dir, so the default `multirun/${run_id:}` must still put both jobs in one
sweep folder (each job would otherwise resolve its own SLURM_JOB_ID into a folder of its own).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from fp8train.sweep.compare import main as compare_main
from tests.slurm.helpers import (FAST, JOB_S, LAUNCH, START_S, SWEEP_DIRNAME, assert_finished_run,
                                 clean_env, metrics, wait_until)

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def test_two_job_sweep_through_submitit(tmp_path, cluster, submitit_plugin):
    steps = 4
    cmd = [sys.executable, str(LAUNCH), "-m", "hydra/launcher=slurm",
           "hydra.launcher.tasks_per_node=2", "hydra.launcher.cpus_per_task=1",
           "hydra.launcher.timeout_min=10", "+recipe=bf16,v3_fp8", *FAST, SWEEP_DIRNAME,
           f"trainer.max_steps={steps}", "trainer.eval_every=2", "trainer.save_every=2"]
    done = subprocess.run(cmd, cwd=tmp_path, env=clean_env(),
                          capture_output=True, text=True, timeout=JOB_S)
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]

    sweeps = [d for d in (tmp_path / "multirun").iterdir() if d.is_dir()]
    assert len(sweeps) == 1, f"jobs landed in several sweep folders: {sweeps}"
    runs = sorted(p.parent for p in sweeps[0].glob("*/summary.json"))
    assert len(runs) == 2, list(sweeps[0].iterdir())
    recipes = [assert_finished_run(run, steps=steps, world_size=2, eval_every=2)["recipe"] for run in runs]
    assert recipes == ["bf16", "v3_fp8"]

    # each task of a job got its own rank from the callback, in the same world
    logs = "".join(p.read_text() for p in sweeps[0].glob(".submitit/*/*_log.out"))
    for rank in (0, 1):
        assert logs.count(f"submitit_env: task rank {rank}/2") == 2, logs[-3000:]

    assert compare_main([str(sweeps[0]), "--window", "2"]) == 0
    assert {"compare.md", "loss_curves.png", "loss_gap.png"} <= {p.name for p in sweeps[0].iterdir()}


def test_sweep_job_checkpoints_before_submitit_requeues_it(tmp_path, cluster, submitit_plugin):
    """SIGUSR2 is submitit's 'time is nearly up / preempted' signal. The job must first save a
    checkpoint (the trainer stops at the next step), then requeue, then resume from that step,
    while the submitting command waits for the requeued attempt."""
    sweep, steps = tmp_path / "sweep", 150
    cmd = [sys.executable, str(LAUNCH), "-m", "hydra/launcher=slurm",
           "hydra.launcher.tasks_per_node=2", "hydra.launcher.cpus_per_task=1",
           "hydra.launcher.timeout_min=10", f"hydra.sweep.dir={sweep}", "hydra.sweep.subdir=job",
           "+recipe=bf16", *FAST, f"trainer.max_steps={steps}", "trainer.eval_every=50",
           "trainer.save_every=50"]
    sweeper = subprocess.Popen(cmd, cwd=tmp_path, env=clean_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        run = sweep / "job"
        wait_until(lambda: (run / "metrics.jsonl").is_file() and len(metrics(run)) >= 2,
                   timeout=START_S, what="the first training steps")
        [job_dir] = submitit_job_dirs(sweep)
        subprocess.run(["scancel", "--signal=USR2", job_dir.name], check=True)
        out, _ = sweeper.communicate(timeout=JOB_S)
    finally:
        if sweeper.poll() is None:  # do not leave the job running behind a failed test
            sweeper.kill()
            for job_dir in submitit_job_dirs(sweep):
                subprocess.run(["scancel", job_dir.name])
    assert sweeper.returncode == 0, out[-6000:]

    logs = "".join(p.read_text() for p in job_dir.glob("*_log.*"))
    assert "Requeued job" in logs, logs[-4000:]
    stopped = re.search(r"stopped by signal \d+ at step (\d+); checkpoint saved", logs)
    resumed = re.search(r"resumed from \S+step_(\d+) at step (\d+)", logs)
    assert stopped and resumed, logs[-4000:]
    assert 1 <= int(stopped.group(1)) < steps
    assert int(resumed.group(1)) == int(resumed.group(2)) == int(stopped.group(1))
    assert_finished_run(run, steps=steps, world_size=2, eval_every=50)


def submitit_job_dirs(sweep: Path) -> list[Path]:
    """submitit keeps one folder per Slurm job, named by its id: `123`, or `123_0` in an array."""
    folder = sweep / ".submitit"
    return [d for d in folder.iterdir() if re.fullmatch(r"\d+(_\d+)?", d.name)] if folder.is_dir() else []
