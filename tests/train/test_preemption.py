"""SIGTERM / SIGUSR1: every rank stops on the same step, saves, writes PREEMPTED, exits 0."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from fp8train.train.checkpoint import tag_for
from tests.train.helpers import FAST, REPO, check_ok, clean_env, command, launch, metrics, output

LONG = ("+recipe=bf16", "trainer.max_steps=100000", "optim.decay_steps=100000")


def _start(run_dir: Path, nproc: int) -> subprocess.Popen:
    """Console output goes to a file beside the run folder (a pipe could fill up and block)."""
    console = open(run_dir.parent / f"{run_dir.name}.console.txt", "w")
    process = subprocess.Popen(command(*FAST, *LONG, f"hydra.run.dir={run_dir}", nproc=nproc),
                               cwd=REPO, env=clean_env(), stdout=console, stderr=subprocess.STDOUT)
    process.console = Path(console.name)
    return process


def _wait_for_steps(process: subprocess.Popen, run_dir: Path, steps: int, timeout: float) -> None:
    deadline = time.time() + timeout
    path = run_dir / "metrics.jsonl"
    while time.time() < deadline:
        assert process.poll() is None, process.console.read_text()[-4000:]
        if path.exists() and len(path.read_text().splitlines()) >= steps:
            return
        time.sleep(0.2)
    process.kill()
    raise AssertionError(f"no {steps} steps within {timeout} s")


def _children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _check_stopped_cleanly(process: subprocess.Popen, run_dir: Path) -> int:
    process.wait(timeout=180)
    assert process.returncode == 0, process.console.read_text()[-4000:]
    last_step = max(metrics(run_dir))
    assert (run_dir / "PREEMPTED").read_text().startswith(f"step {last_step} ")
    assert (run_dir / "checkpoints" / "latest").read_text() == tag_for(last_step)
    assert (run_dir / "checkpoints" / tag_for(last_step) / "fp8train_meta.json").is_file()
    return last_step


def test_sigterm_saves_marks_preempted_and_resume_continues(tmp_path):
    run_dir = tmp_path / "run"
    process = _start(run_dir, nproc=1)
    _wait_for_steps(process, run_dir, steps=3, timeout=180)
    process.send_signal(signal.SIGTERM)
    stopped_at = _check_stopped_cleanly(process, run_dir)

    resumed = check_ok(launch(run_dir, *LONG[:1], f"trainer.max_steps={stopped_at + 2}",
                              "optim.decay_steps=100000"))
    assert f"resumed from {run_dir / 'checkpoints' / tag_for(stopped_at)}" in output(resumed)
    assert not (run_dir / "PREEMPTED").exists()  # a finished attempt must not be requeued
    assert max(metrics(run_dir)) == stopped_at + 2


@pytest.mark.slow
def test_signal_to_one_rank_stops_both_on_the_same_step(tmp_path):
    run_dir = tmp_path / "run"
    process = _start(run_dir, nproc=2)
    _wait_for_steps(process, run_dir, steps=3, timeout=240)
    workers = _children(process.pid)
    assert len(workers) == 2, workers
    os.kill(workers[1], signal.SIGUSR1)  # only one rank hears it
    stopped_at = _check_stopped_cleanly(process, run_dir)
    meta = (run_dir / "checkpoints" / tag_for(stopped_at) / "fp8train_meta.json").read_text()
    assert '"world_size": 2' in meta
