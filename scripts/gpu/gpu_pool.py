"""Run jobs one process each, spread over the visible GPUs (scripts/gpu/grouped_probe.py, isolated_tests.py).

A kernel fault (illegal instruction or address) poisons its process's CUDA context, so every job
gets a fresh process on one GPU (CUDA_VISIBLE_DEVICES), at most one job per GPU at a time. Output
goes to a log file per job (no pipe to fill); a job past `timeout` seconds is killed.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Finished:
    job: object
    returncode: int | None  # None: killed at the timeout
    log: Path
    seconds: float

    @property
    def text(self) -> str:
        return self.log.read_text(errors="replace")


def run_on_gpus(jobs: list, command_for, gpus: int, timeout: float, log_dir: Path) -> list[Finished]:
    """`command_for(job)` -> argv; runs from the repo root with PYTHONPATH set to it."""
    log_dir.mkdir(parents=True, exist_ok=True)
    pending, running, done = list(jobs), {}, []
    while pending or running:
        while pending and len(running) < gpus:
            gpu = next(g for g in range(gpus) if g not in running)
            job = pending.pop(0)
            log = log_dir / (re.sub(r"[^A-Za-z0-9_.-]", "_", str(job))[:150] + ".log")
            handle = open(log, "w")
            env = {**os.environ, "CUDA_VISIBLE_DEVICES": str(gpu), "PYTHONPATH": str(ROOT)}
            proc = subprocess.Popen(command_for(job), cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT)
            running[gpu] = (job, proc, time.time(), log, handle)
        for gpu, (job, proc, t0, log, handle) in list(running.items()):
            if proc.poll() is None and time.time() - t0 < timeout:
                continue
            timed_out = proc.poll() is None
            if timed_out:
                proc.kill()
                proc.wait()
            handle.close()
            done.append(Finished(job, None if timed_out else proc.returncode, log, time.time() - t0))
            del running[gpu]
        time.sleep(0.2)
    return done
