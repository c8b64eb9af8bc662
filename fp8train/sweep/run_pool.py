"""Run many training jobs of the real trainer, one per GPU at a time (or one after another on CPU).

Each job is one `python launch/train.py <overrides> hydra.run.dir=<run_dir>` subprocess. A pool of
slots runs them: on a machine with G GPUs, G slots, each pinned to one GPU through
CUDA_VISIBLE_DEVICES (so every job sees exactly one device, `cuda:0`); on a CPU machine,
`parallel` slots (default 1: the jobs would only fight for the same cores).

A job whose run folder already holds a summary.json of a finished run is not run again, and one
that stopped half-way continues from its checkpoint (the trainer's `trainer.resume=auto`): a study
interrupted at any point is completed by running the same command again. With a `deadline_s`
the pool starts no job after it and sends SIGTERM to the running ones, which checkpoint and stop
(the trainer's preemption path); the next invocation resumes them, so a study longer than one
allowed session runs as several calls of the same command.
Each job's console output goes to <run_dir>.log next to its folder.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LAUNCH = REPO / "launch" / "train.py"
# set by torchrun / Slurm / an enclosing run: a child job must not think it is rank k of a group
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                 "TORCHELASTIC_RUN_ID", "FP8TRAIN_RUN_ID", "SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID",
                 "SLURM_ARRAY_TASK_ID", "SLURM_PROCID", "CUDA_VISIBLE_DEVICES")


@dataclass
class Job:
    label: str                # recipe label in the study (the run's recipe.name)
    seed: int
    overrides: list[str]      # Hydra overrides, hydra.run.dir excluded
    run_dir: Path
    returncode: int | None = None
    seconds: float = 0.0
    skipped: bool = False     # already finished before this invocation
    device: str = field(default="")

    @property
    def log_path(self) -> Path:
        return self.run_dir.with_suffix(".log")

    def command(self) -> list[str]:
        return [sys.executable, str(LAUNCH), *self.overrides, f"hydra.run.dir={self.run_dir}"]

    def finished(self) -> bool:
        summary = self.run_dir / "summary.json"
        return summary.is_file() and not json.loads(summary.read_text()).get("preempted", False)


def visible_gpus() -> list[str]:
    """CUDA device ids this process may use (honours an outer CUDA_VISIBLE_DEVICES)."""
    outer = os.environ.get("CUDA_VISIBLE_DEVICES")
    if outer is not None:
        return [d for d in outer.split(",") if d.strip()]
    import torch  # noqa: PLC0415  (only to count devices)
    return [str(i) for i in range(torch.cuda.device_count())]


def job_env(device: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env["PYTHONUNBUFFERED"] = "1"
    if device is not None:
        env["CUDA_VISIBLE_DEVICES"] = device
    return env


def _start(job: Job, device: str | None) -> subprocess.Popen:
    job.run_dir.parent.mkdir(parents=True, exist_ok=True)
    job.device = f"cuda:{device}" if device is not None else "cpu"
    log = open(job.log_path, "a")  # noqa: SIM115 (closed when the process is reaped)
    log.write(f"$ {' '.join(job.command())}\n")
    log.flush()
    process = subprocess.Popen(job.command(), cwd=REPO, env=job_env(device), stdout=log,
                               stderr=subprocess.STDOUT)
    process.log_file = log  # type: ignore[attr-defined]
    return process


def run_jobs(jobs: list[Job], devices: list[str | None], echo=print, poll_s: float = 1.0,
             deadline_s: float | None = None) -> list[Job]:
    """Run every unfinished job, at most one per device at once; returns the jobs with results.
    After `deadline_s` seconds no job starts and running ones get SIGTERM (they checkpoint)."""
    if not devices:
        raise ValueError("run_jobs needs at least one slot (a GPU id, or None for a CPU slot)")
    pending = []
    for job in jobs:
        if job.finished():
            job.skipped, job.returncode = True, 0
            echo(f"[study] {job.label} seed {job.seed}: already finished ({job.run_dir})")
        else:
            pending.append(job)
    running: dict[int, tuple[Job, subprocess.Popen, float]] = {}  # slot index -> running job
    free = list(range(len(devices)))
    started_at, stopping = time.perf_counter(), False
    while (pending and not stopping) or running:
        if deadline_s is not None and not stopping and time.perf_counter() - started_at > deadline_s:
            stopping = True
            echo(f"[study] deadline {deadline_s:.0f} s: {len(pending)} run(s) left for the next call; "
                 f"stopping {len(running)} running run(s) at their next step (they checkpoint)")
            for job, process, _ in running.values():
                process.send_signal(signal.SIGTERM)
        while pending and free and not stopping:
            job, slot = pending.pop(0), free.pop(0)
            running[slot] = (job, _start(job, devices[slot]), time.perf_counter())
            echo(f"[study] start {job.label} seed {job.seed} on {job.device} -> {job.log_path}")
        time.sleep(poll_s if running else 0)
        for slot, (job, process, started) in list(running.items()):
            if process.poll() is None:
                continue
            process.log_file.close()
            job.returncode, job.seconds = process.returncode, time.perf_counter() - started
            state = ("done" if job.finished() or not stopping else "stopped; the next call resumes it") \
                if job.returncode == 0 else f"FAILED (exit {job.returncode}, see {job.log_path})"
            echo(f"[study] {job.label} seed {job.seed}: {state} in {job.seconds:.0f} s")
            del running[slot]
            free.append(slot)
    return jobs
