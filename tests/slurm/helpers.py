"""Talk to the local Slurm cluster (.ci/slurm/setup.sh) from tests: is it up, submit, wait, read."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SUBMIT = REPO / "launch" / "slurm" / "submit.py"
TEMPLATE = REPO / "launch" / "slurm" / "train.sbatch"
LAUNCH = REPO / "launch" / "train.py"

# Seconds per step on 2 CPU cores: tiny model, short sequences, small batches, no wandb.
FAST = ("logger.mode=disabled", "logger.progress_bar=false", "data.seq_len=32",
        "trainer.micro_batch_size=4", "trainer.global_batch_size=8", "data.val_batch_size=4",
        "data.val_batches=2", "optim.warmup_steps=2")
# Hydra names each sweep job's folder after its overrides (conf/config.yaml: hydra.sweep.subdir);
# with all of FAST that name passes the 255-byte file-name limit, so sweeps leave FAST out of it.
SWEEP_DIRNAME = ("hydra.job.config.override_dirname.exclude_keys=[trainer.resume,"
                 + ",".join(o.split("=")[0] for o in FAST) + "]")
# Generous limits for waiting on jobs (they normally finish in well under a minute): on a fresh
# machine the first multi-process DeepSpeed run compiles a comm op (~3 min on 2 cores).
START_S = 420   # until the first training steps
JOB_S = 600     # until a job (including a requeued attempt) has finished
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


def clean_env(**extra: str) -> dict:
    """This environment minus anything an outer Slurm job or torchrun would leak into ours."""
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
            "TORCHELASTIC_RUN_ID", "FP8TRAIN_RUN_ID", "WANDB_MODE")
    env = {k: v for k, v in os.environ.items()
           if k not in drop and not k.startswith(("SLURM_", "SBATCH_", "SUBMITIT_"))}
    env.update(PYTHONUNBUFFERED="1", **extra)
    return env


def cluster_nodes() -> tuple[list[str], str]:
    """(names of usable nodes, reason when there are none)."""
    if shutil.which("sinfo") is None:
        return [], "sinfo not found: no Slurm here (start the CI cluster: bash .ci/slurm/setup.sh)"
    try:
        done = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True, timeout=15)
    except subprocess.TimeoutExpired:
        return [], "sinfo hung for 15 s: slurmctld not answering (bash .ci/slurm/setup.sh)"
    if done.returncode != 0:
        return [], f"no Slurm cluster answering ({done.stderr.strip()}); start one: bash .ci/slurm/setup.sh"
    usable = [line.split()[0] for line in done.stdout.splitlines()
              if line.split() and line.split()[1].rstrip("*") in ("idle", "mix", "alloc")]
    return usable, "" if usable else f"no idle node in sinfo: {done.stdout.strip()!r}"


def job_info(job_id: str) -> dict[str, str]:
    """`scontrol show job -o` as a dict (JobState, Restarts, ExitCode, NodeList, ...)."""
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True).stdout
    return dict(field.split("=", 1) for field in out.split() if "=" in field)


def wait_for_job(job_id: str, timeout: float, log: Path | None = None) -> dict[str, str]:
    """Poll until the job reaches a final state; on timeout cancel it and fail with its log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = job_info(job_id)
        if info.get("JobState") in FINAL_STATES:
            return info
        time.sleep(1)
    subprocess.run(["scancel", job_id])
    tail = log.read_text()[-4000:] if log and log.is_file() else "(no log)"
    raise AssertionError(f"job {job_id} not finished after {timeout} s: {job_info(job_id)}\n{tail}")


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def submit(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """launch/slurm/submit.py with these arguments."""
    return subprocess.run([sys.executable, str(SUBMIT), *args], cwd=REPO, capture_output=True,
                          text=True, env=env or clean_env(), timeout=60)


def metrics(run_dir: Path) -> dict[int, dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {record["step"]: record for record in map(json.loads, filter(None, lines))}


def assert_finished_run(run_dir: Path, steps: int, world_size: int, eval_every: int) -> dict:
    """A complete run: summary, one metrics record per step, val on eval steps, a checkpoint."""
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == steps and summary["world_size"] == world_size, summary
    assert summary["preempted"] is False
    records = metrics(run_dir)
    assert sorted(records) == list(range(1, steps + 1))
    assert [s for s, r in records.items() if "val/loss" in r] == list(range(eval_every, steps + 1, eval_every))
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert (run_dir / "checkpoints" / latest).is_dir(), f"latest -> {latest} missing"
    return summary
