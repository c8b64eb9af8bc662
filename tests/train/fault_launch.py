"""Fault trials on real training launches (launch/train.py, torchrun for 2 ranks), CPU, seconds each.

Every trial runs the same small job (RUN_ARGS, on a small dataset prepared once) into its own run
folder, breaks it one way, checks what is left, resumes it to the end and compares the whole
metrics.jsonl with an uninterrupted reference run, step by step and bit for bit (train loss,
gradient norm, LR, val loss):

    train_kill    kill -9 inside the run: after a random step k, a random fraction of one step's
                  time (kill_point), so inside the next step, an eval or a save
    sigterm       SIGTERM at such a point: exit 0, PREEMPTED, a checkpoint of the step it stopped at
    disk_full     the run folder on a small tmpfs (or, where mounting is impossible, a file-size
                  limit, RLIMIT_FSIZE): the save that does not fit stops the run with exit code 3
                  and a message naming the checkpoint and the free space; then space is freed
    data_changed  train.bin rewritten in place mid-run: exit code 3 naming the file; restored
    rank_death    2 ranks under torchrun, kill -9 of rank 1: the job fails (torchrun names the
                  rank and the signal); resumed with 2 ranks, compared with a 2-rank reference

After each break: `latest` names a complete checkpoint whose sha256 manifest verifies, so nothing
already saved was lost. Random choices come from random.Random(seed). Without a reference
(expected=None, the cheaper CI variant) the resumed run must have every step and repeat bit for
bit each step the broken run had logged (before the change, for data_changed).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np

from fp8train.train.checkpoint import Checkpointer, find_checkpoint
from tests.train.helpers import FAST, REPO, clean_env, command, launch, metrics, output

STEPS = 8
RUN_ARGS = (*FAST, "+recipe=v3_fp8", f"trainer.max_steps={STEPS}", "trainer.save_every=2",
            "trainer.eval_every=4", f"optim.decay_steps={STEPS}", "trainer.keep_last=2")
COMPARED = ("tokens", "train/loss", "train/grad_norm", "train/lr", "val/loss")


def small_dataset(directory: Path) -> Path:
    """A few thousand tokens of Python: prepared in well under a second."""
    from fp8train.data import prepare_dataset

    if (directory / "meta.json").is_file():
        return directory
    text = directory.parent / f"{directory.name}_text"
    text.mkdir(parents=True, exist_ok=True)
    (text / "a.py").write_text("".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(300)))
    return prepare_dataset([text], directory, val_fraction=0.2, progress=False)


def args_for(dataset: Path, *extra: str) -> tuple[str, ...]:
    return (*RUN_ARGS, f"data.path={dataset}", *extra)


def reference(workdir: Path, dataset: Path, nproc: int = 1) -> dict[int, dict]:
    """The uninterrupted run's metrics (run once per workdir and rank count)."""
    run_dir = workdir / f"reference_{nproc}proc"
    if not (run_dir / "summary.json").is_file():
        shutil.rmtree(run_dir, ignore_errors=True)
        _ok(launch(run_dir, *args_for(dataset), nproc=nproc, fast=False))
    return metrics(run_dir)


def trajectory_problem(expected: dict[int, dict], actual: dict[int, dict]) -> str | None:
    if sorted(actual) != sorted(expected):
        return f"steps {sorted(actual)} instead of {sorted(expected)}"
    for step, record in expected.items():
        for key in COMPARED:
            if actual[step].get(key) != record.get(key):
                return f"step {step} {key}: {actual[step].get(key)} instead of {record.get(key)}"
    return None


def saved_problem(run_dir: Path) -> str | None:
    """None if `latest` (when any) names a complete checkpoint whose files all verify."""
    try:
        ref = find_checkpoint("auto", run_dir)
        if ref is not None:
            ref = Checkpointer(run_dir, 2, {}, 0, 1).verified(ref, fallback=False)
    except ValueError as error:
        return f"saved checkpoint damaged: {error}"
    return None


def _ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    if result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}: {output(result)[-3000:]}")
    return result


def _start(run_dir: Path, args, nproc: int = 1, preexec_fn=None) -> subprocess.Popen:
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    console = open(run_dir.parent / f"{run_dir.name}.console.txt", "w")
    process = subprocess.Popen(command(*args, f"hydra.run.dir={run_dir}", nproc=nproc), cwd=REPO,
                               env=clean_env(), stdout=console, stderr=subprocess.STDOUT,
                               preexec_fn=preexec_fn)
    process.console = Path(console.name)
    return process


def _logged_steps(run_dir: Path) -> list[int]:
    """Steps in metrics.jsonl so far (a line still being written is ignored)."""
    path, steps = run_dir / "metrics.jsonl", []
    for line in path.read_text().splitlines() if path.is_file() else []:
        with contextlib.suppress(json.JSONDecodeError):
            record = json.loads(line)
            steps += [record["step"]] if "event" not in record else []
    return steps


def _wait_for_step(process: subprocess.Popen, run_dir: Path, step: int, timeout: float = 300,
                   poll: float = 0.05) -> float | None:
    """The time metrics.jsonl was first seen with `step`; None if the process ended first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if max(_logged_steps(run_dir), default=0) >= step:
            return time.time()
        if process.poll() is not None:
            return None
        time.sleep(poll)
    process.kill()
    raise AssertionError(f"step {step} not reached within {timeout} s")


def _resume_and_compare(run_dir: Path, dataset: Path, expected, nproc: int = 1) -> str:
    """Resume to the end; compare with `expected`, or (None) check that the final run has every
    step and repeats bit for bit each step the broken run had logged (the replayed ones)."""
    before = metrics(run_dir) if (run_dir / "metrics.jsonl").is_file() else {}
    before.update(metrics(run_dir, "metrics.discarded.jsonl")
                  if (run_dir / "metrics.discarded.jsonl").is_file() else {})
    _ok(launch(run_dir, *args_for(dataset), nproc=nproc, fast=False))
    after = metrics(run_dir)
    if expected is None:
        expected = {**after, **before}
        if sorted(after) != list(range(1, STEPS + 1)):
            return f"FAIL: resumed run has steps {sorted(after)}"
    problem = trajectory_problem(expected, after)
    return f"FAIL: resumed run differs: {problem}" if problem else "ok"


def _finish(row: dict, run_dir: Path, dataset: Path, expected, nproc: int = 1) -> dict:
    problem = saved_problem(run_dir)
    if problem:
        return {**row, "outcome": f"FAIL: {problem}"}
    return {**row, "outcome": _resume_and_compare(run_dir, dataset, expected, nproc)}


ATTEMPTS = 3  # a point that missed the run is retried closer to its step (see inside_run)


def kill_point(rng: random.Random, last_step: int) -> tuple[int, float]:
    """A seeded point inside the run: after step k (2 <= k <= last_step) is logged, a fraction of
    one step's time (the shortest step so far, measured). The save of an even step, the eval of
    every 4th and the next step lie in that window, so the signal lands in one of them."""
    return rng.randint(2, last_step), rng.random()


class MissedTheRun(RuntimeError):
    """The signal came after training had ended: the trial tested nothing (a timing miss)."""


def signal_inside_run(process: subprocess.Popen, run_dir: Path, point: tuple[int, float],
                      send) -> str:
    """Wait for step k, sleep fraction x the shortest step seen so far, call `send()` while the
    process still runs; returns where it landed. Raises MissedTheRun if the run had ended."""
    step, fraction = point
    seen = [_wait_for_step(process, run_dir, s, poll=0.005) for s in range(1, step + 1)]
    if None in seen:
        raise MissedTheRun(f"the run ended (exit {process.poll()}) before step {step} was logged")
    step_s = min(b - a for a, b in zip(seen, seen[1:]))
    time.sleep(fraction * step_s)
    at = max(_logged_steps(run_dir))
    if process.poll() is not None:
        raise MissedTheRun(f"the run ended (exit {process.returncode}) before the point")
    send()
    return f"step {step} +{fraction:.3f} x {step_s * 1000:.0f} ms (step {at} logged)"


def _training_ended(run_dir: Path) -> bool:
    return (run_dir / "summary.json").is_file() and max(_logged_steps(run_dir), default=0) >= STEPS


def inside_run(kind: str, workdir: Path, seed: int, last_step: int, attempt) -> dict:
    """Run `attempt(run_dir, point)` at the seeded kill_point. Steps on a shared CPU vary by 10x
    (another job's load comes and goes), so a point can land after training has ended: that
    attempt tested nothing (MissedTheRun), and the trial is repeated in a fresh run folder at the
    seeded next point, 4x closer to its step, up to ATTEMPTS times; the row says which one."""
    rng, missed = random.Random(seed), []
    for number in range(ATTEMPTS):
        step, fraction = kill_point(rng, last_step)
        run_dir = workdir / (f"{kind}_{seed}" + (f"_attempt{number + 1}" if number else ""))
        try:
            row = attempt(run_dir, (step, fraction / 4 ** number))
        except MissedTheRun as error:
            missed.append(str(error))
            continue
        note = f" (attempt {number + 1}; missed: {'; '.join(missed)})" if missed else ""
        return {"kind": kind, "seed": seed, **row, "fault": row["fault"] + note}
    return {"kind": kind, "seed": seed, "fault": "", "outcome": f"FAIL: every point missed the "
            f"run: {'; '.join(missed)}"}


def train_kill(workdir: Path, dataset: Path, seed: int, expected) -> dict:
    """kill -9 inside the run: during a step, an eval or a save (kill_point)."""
    def attempt(run_dir: Path, point) -> dict:
        process = _start(run_dir, args_for(dataset))
        fault = signal_inside_run(process, run_dir, point, process.kill)
        process.wait()
        if _training_ended(run_dir):
            raise MissedTheRun(f"{fault}: the run had finished")
        return _finish({"fault": fault}, run_dir, dataset, expected)
    return inside_run("train_kill", workdir, seed, STEPS - 1, attempt)


def sigterm(workdir: Path, dataset: Path, seed: int, expected) -> dict:
    """SIGTERM inside the run (kill_point, k <= STEPS - 2: the run has steps left to skip):
    exit 0, PREEMPTED naming the step of the last checkpoint, summary preempted=true. A signal
    that came after the last step must leave a finished run: exit 0 (then it is retried)."""
    def attempt(run_dir: Path, point) -> dict:
        process = _start(run_dir, args_for(dataset))
        fault = signal_inside_run(process, run_dir, point,
                                  lambda: process.send_signal(signal.SIGTERM))
        rc = process.wait(timeout=300)
        marker = run_dir / "PREEMPTED"
        if rc == 0 and not marker.exists() and _training_ended(run_dir):
            raise MissedTheRun(f"{fault}: the run had finished (exit 0)")
        if rc != 0 or not marker.is_file():
            return {"fault": fault, "outcome": f"FAIL: exit {rc}, no PREEMPTED marker; "
                                               f"{process.console.read_text()[-1500:]}"}
        stopped = max(metrics(run_dir))
        summary = json.loads((run_dir / "summary.json").read_text())
        if not marker.read_text().startswith(f"step {stopped} ") or not summary["preempted"]:
            return {"fault": fault, "outcome": f"FAIL: PREEMPTED says {marker.read_text().strip()!r}, "
                                               f"last step {stopped}, summary {summary['preempted']=}"}
        fault += f", preempted at step {stopped}"
        return _finish({"fault": fault}, run_dir, dataset, expected)
    return inside_run("sigterm", workdir, seed, STEPS - 2, attempt)


@contextlib.contextmanager
def small_disk(path: Path, megabytes: int):
    """A tmpfs of that size at `path` (root with CAP_SYS_ADMIN); yields a resize function, or
    None where mounting is impossible (the caller then limits file sizes instead)."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(path)],
                             capture_output=True).returncode == 0
    try:
        yield (lambda mb: subprocess.run(["mount", "-o", f"remount,size={mb}m", str(path)],
                                         check=True)) if mounted else None
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _file_size_limit(limit_bytes: int):
    def apply() -> None:  # in the child, before exec: writes past the limit fail with EFBIG
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))
    return apply


def disk_full(workdir: Path, dataset: Path, seed: int, expected) -> dict:
    """Checkpoints of this job take ~7 MB: 16-20 MB hold two, the third save fails."""
    rng = random.Random(seed)
    megabytes = rng.randint(16, 20)
    mount = workdir / f"disk_full_{seed}"
    with small_disk(mount, megabytes) as resize:
        run_dir = mount / "run"
        limit = None if resize else _file_size_limit(rng.randint(2, 5) << 20)
        how = f"tmpfs {megabytes} MB" if resize else "RLIMIT_FSIZE (mount not permitted)"
        process = _start(run_dir, args_for(dataset), preexec_fn=limit)
        rc = process.wait(timeout=600)
        text = process.console.read_text()
        row = {"kind": "disk_full", "seed": seed, "fault": how}
        if rc != 3 or "could not write checkpoint" not in text or "MiB free" not in text:
            return {**row, "outcome": f"FAIL: exit {rc}; {text[-1500:]}"}
        if resize:
            resize(256)
        return _finish(row, run_dir, dataset, expected)


def data_changed(workdir: Path, dataset: Path, seed: int, expected) -> dict:
    rng = random.Random(seed)
    step = rng.randint(1, STEPS - 2)
    own = workdir / f"data_changed_{seed}_dataset"
    shutil.copytree(dataset, own, dirs_exist_ok=True)
    run_dir = workdir / f"data_changed_{seed}"
    process = _start(run_dir, args_for(own))
    _wait_for_step(process, run_dir, step)
    train_bin = own / "train.bin"
    original = train_bin.read_bytes()
    dtype = np.dtype(json.loads((own / "meta.json").read_text())["dtype"])
    head = np.frombuffer(original[:4096], dtype=dtype)
    with open(train_bin, "r+b") as handle:  # same size, other (valid: the same ids reversed) tokens
        handle.write(head[::-1].tobytes())
    rc = process.wait(timeout=300)
    text = process.console.read_text()
    row = {"kind": "data_changed", "seed": seed, "fault": f"train.bin rewritten after step {step}"}
    if rc != 3 or f"{train_bin} was modified" not in text:
        return {**row, "outcome": f"FAIL: exit {rc}; {text[-1500:]}"}
    train_bin.write_bytes(original)
    problem = saved_problem(run_dir)
    if problem:
        return {**row, "outcome": f"FAIL: {problem}"}
    clean = {s: r for s, r in metrics(run_dir).items() if s <= step}  # logged before the change
    _ok(launch(run_dir, *args_for(own), fast=False))
    after = metrics(run_dir)
    if expected is None:  # no reference run: the steps logged before the change must repeat
        expected = {**after, **clean}
    problem = trajectory_problem(expected, after)
    return {**row, "outcome": f"FAIL: resumed run differs: {problem}" if problem else "ok"}


def _workers(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def rank_death(workdir: Path, dataset: Path, seed: int, expected_2proc) -> dict:
    def attempt(run_dir: Path, point) -> dict:
        process = _start(run_dir, args_for(dataset), nproc=2)
        fault = "rank 1 killed, " + signal_inside_run(
            process, run_dir, point, lambda: os.kill(_workers(process.pid)[-1], signal.SIGKILL))
        rc = process.wait(timeout=300)
        text = process.console.read_text()
        if rc == 0 and _training_ended(run_dir):
            raise MissedTheRun(f"{fault}: the run had finished (exit 0)")
        if rc == 0 or "Signal 9 (SIGKILL)" not in text:
            return {"fault": fault, "outcome": f"FAIL: exit {rc}; {text[-1500:]}"}
        return _finish({"fault": fault}, run_dir, dataset, expected_2proc, nproc=2)
    return inside_run("rank_death", workdir, seed, STEPS - 2, attempt)
