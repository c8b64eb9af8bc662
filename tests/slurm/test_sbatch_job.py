"""The sbatch template on the real cluster: a 2-process CPU (gloo) job, and preemption.

On the two-node CI cluster (.ci/slurm/setup.sh) the job spans 2 nodes, 1 torchrun each, which
rendezvous over TCP between two network namespaces; on a one-node cluster it is 2 processes
on one node. Each job takes well under 2 minutes of CPU.
"""

from __future__ import annotations

import re
import subprocess

import pytest

from tests.slurm.helpers import (FAST, JOB_S, START_S, assert_finished_run, job_info, metrics, submit,
                                 wait_for_job, wait_until)

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def submit_job(run_dir, layout, *overrides: str) -> str:
    nodes, procs = layout
    done = submit("--cpu", "--nodes", str(nodes), "--procs-per-node", str(procs), "--time", "10",
                  "--signal-seconds", "60", "--run-dir", str(run_dir), "--parsable", "--", *FAST, *overrides)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_two_process_cpu_job(tmp_path, layout):
    run_dir = tmp_path / "run"
    job = submit_job(run_dir, layout, "+recipe=v3_fp8", "trainer.max_steps=6",
                     "trainer.eval_every=3", "trainer.save_every=3")
    log = run_dir / f"slurm-{job}.out"
    info = wait_for_job(job, timeout=JOB_S, log=log)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log.read_text()[-4000:]
    summary = assert_finished_run(run_dir, steps=6, world_size=2, eval_every=3)
    assert summary["recipe"] == "v3_fp8"
    assert (run_dir / "train.rank0.log").is_file() and (run_dir / "train.rank1.log").is_file()
    text = log.read_text()
    nodes, procs = layout
    assert f"{nodes} node(s) x {procs} worker(s)" in text
    if nodes == 2:  # one torchrun per node: the job really held both nodes
        hosts = subprocess.run(["scontrol", "show", "hostnames", info["NodeList"]],
                               capture_output=True, text=True).stdout.split()
        assert len(hosts) == 2, info["NodeList"]


def test_preempted_job_checkpoints_requeues_and_resumes(tmp_path, layout):
    """USR1 to the batch shell (what --signal=B:USR1@N sends before the limit): the job saves a
    checkpoint, requeues itself, and the next attempt resumes from that step and finishes."""
    run_dir, steps = tmp_path / "run", 150
    job = submit_job(run_dir, layout, "+recipe=bf16", f"trainer.max_steps={steps}",
                     "trainer.eval_every=50", "trainer.save_every=50")
    log = run_dir / f"slurm-{job}.out"
    wait_until(lambda: (run_dir / "metrics.jsonl").is_file() and len(metrics(run_dir)) >= 2,
               timeout=START_S, what="the first training steps")
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True)
    info = wait_for_job(job, timeout=JOB_S, log=log)
    text = log.read_text()
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), text[-4000:]

    stopped = re.search(r"checkpoint saved before preemption: step (\d+)", text)
    resumed = re.search(r"resumed from \S+step_(\d+) at step (\d+)", text)
    assert stopped and resumed, text[-4000:]
    stop_step = int(stopped.group(1))
    assert 1 <= stop_step < steps, "the signal must land mid-run for this test to mean anything"
    assert int(resumed.group(1)) == int(resumed.group(2)) == stop_step
    assert text.count("attempt 2:") == 1 and "requeueing job" in text
    assert not (run_dir / "PREEMPTED").exists()
    assert_finished_run(run_dir, steps=steps, world_size=2, eval_every=50)


def test_cancelled_job_saves_a_checkpoint_and_stays_cancelled(tmp_path, layout):
    """scancel sends SIGTERM: the trainer still checkpoints, but a cancelled job is not requeued
    (Slurm itself would accept `scontrol requeue` while the cancelled job is completing)."""
    run_dir = tmp_path / "run"
    job = submit_job(run_dir, layout, "+recipe=bf16", "trainer.max_steps=400",
                     "trainer.eval_every=400", "trainer.save_every=400")
    log = run_dir / f"slurm-{job}.out"
    wait_until(lambda: (run_dir / "metrics.jsonl").is_file() and len(metrics(run_dir)) >= 2,
               timeout=START_S, what="the first training steps")
    subprocess.run(["scancel", job], check=True)
    wait_until(lambda: not in_queue(job), timeout=120, what=f"job {job} to leave the queue")
    info = job_info(job)
    assert (info["JobState"], info["Restarts"]) == ("CANCELLED", "0"), log.read_text()[-4000:]
    assert "(cancelled or out of time): not requeueing" in log.read_text()
    step = int(re.search(r"step (\d+)", (run_dir / "PREEMPTED").read_text()).group(1))
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert latest == f"step_{step:07d}", (latest, step)
    assert not (run_dir / "summary.json").exists() or '"preempted": true' in (run_dir / "summary.json").read_text()


def in_queue(job: str) -> bool:
    """Still pending, running or completing (squeue lists completing jobs as CG)."""
    return bool(subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True).stdout.strip())


def test_signal_during_start_up_still_requeues(tmp_path, layout):
    """Slurm may send the --signal warning up to 60 s early, even before the trainer has its
    handlers: the processes die without a checkpoint, and the job must come back anyway."""
    run_dir = tmp_path / "run"
    job = submit_job(run_dir, layout, "+recipe=bf16", "trainer.max_steps=6", "trainer.eval_every=3",
                     "trainer.save_every=3")
    log = run_dir / f"slurm-{job}.out"
    wait_until(lambda: log.is_file() and "attempt 1:" in log.read_text(), timeout=120, what="job start")
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True)
    info = wait_for_job(job, timeout=JOB_S, log=log)
    text = log.read_text()
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), text[-4000:]
    assert "ended the step before training could checkpoint" in text, text[-4000:]
    assert_finished_run(run_dir, steps=6, world_size=2, eval_every=3)
