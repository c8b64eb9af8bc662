"""SIGTERM / SIGUSR1: every rank stops on the same step, saves, writes PREEMPTED, exits 0."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fp8train.train.checkpoint import tag_for
from tests.train.helpers import FAST, REPO, check_ok, clean_env, command, launch, metrics, output

LONG = ("+recipe=bf16", "trainer.max_steps=100000", "optim.decay_steps=100000")


def _start(run_dir: Path, nproc: int, *extra: str) -> subprocess.Popen:
    """Console output goes to a file beside the run folder (a pipe could fill up and block)."""
    console = open(run_dir.parent / f"{run_dir.name}.console.txt", "w")
    process = subprocess.Popen(command(*FAST, *LONG, *extra, f"hydra.run.dir={run_dir}", nproc=nproc),
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
    process = _start(run_dir, 1, "trainer.eval_every=1")  # the stop falls on an eval step
    _wait_for_steps(process, run_dir, steps=3, timeout=180)
    process.send_signal(signal.SIGTERM)
    stopped_at = _check_stopped_cleanly(process, run_dir)
    assert "val/loss" in metrics(run_dir)[stopped_at]  # a preemption skips no scheduled eval

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


_LATE_SIGNAL = """
import atexit, os, signal, sys, time
import torch
from fp8train.train.signals import PreemptionFlag

def teardown_signal():  # registered first, so it runs after stand_down's exit hook
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.2)
    print("torn down")

atexit.register(teardown_signal)
flag = PreemptionFlag(torch.device("cpu"))
if sys.argv[1] == "after_the_last_poll":  # came during the final save: not acted on, reported
    flag.should_stop()
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.2)
    print("returned:", flag.stand_down())
elif sys.argv[1] == "stand_down":
    flag.stand_down()
else:
    flag.restore()
os.kill(os.getpid(), signal.SIGTERM)  # after the run, while the job function returns
time.sleep(0.2)
print("still running")
"""


@pytest.mark.parametrize("when", ["stand_down", "after_the_last_poll", "restore"])
def test_a_stop_signal_after_the_run_ended_changes_nothing(when):
    """After stand_down() (run(): the process exits next) a SIGTERM prints one line, one during
    the interpreter's teardown is ignored, and the process exits 0; with the previous (default)
    handler restored the first one kills it with -15 (the campaign's failure before the fix)."""
    result = subprocess.run([sys.executable, "-c", _LATE_SIGNAL, when], cwd=REPO, env=clean_env(),
                            capture_output=True, text=True, timeout=120)
    if when == "restore":  # the control: what a late SIGTERM did before stand_down existed
        assert result.returncode == -signal.SIGTERM, output(result)
        assert "still running" not in result.stdout
        return
    assert result.returncode == 0, output(result)
    assert "still running" in result.stdout and "torn down" in result.stdout
    late = "fp8train: SIGTERM received after the run had ended: nothing left to save"
    assert result.stderr.count(late) == 1, output(result)  # the teardown's signal: no line
    if when == "after_the_last_poll":
        assert f"returned: {late}" in result.stdout
