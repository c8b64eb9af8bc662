"""Run the real entry point (launch/train.py, or torchrun on it) as a subprocess; read outputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LAUNCH = REPO / "launch" / "train.py"

# A few seconds per run on 2 CPU cores: tiny model, short sequences, small batches, no wandb.
FAST = ("logger.mode=disabled", "logger.progress_bar=false", "data.seq_len=32",
        "trainer.micro_batch_size=4", "trainer.global_batch_size=8", "data.val_batch_size=4",
        "data.val_batches=2", "optim.warmup_steps=2")
_LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                  "MASTER_PORT", "TORCHELASTIC_RUN_ID", "FP8TRAIN_RUN_ID", "SLURM_JOB_ID",
                  "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "WANDB_MODE")


def clean_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_VARS}
    env.update(PYTHONUNBUFFERED="1", **extra)
    return env


def command(*overrides: str, nproc: int = 1, script: Path = LAUNCH) -> list[str]:
    if nproc == 1:
        return [sys.executable, str(script), *overrides]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={nproc}", str(script), *overrides]


def launch(run_dir: Path | None, *overrides: str, nproc: int = 1, fast: bool = True,
           env: dict | None = None, script: Path = LAUNCH, timeout: int = 600,
           multirun: bool = False) -> subprocess.CompletedProcess:
    """Run one training job (or a Hydra multirun) to completion; output is returned as text."""
    args = [*(["-m"] if multirun else []), *(FAST if fast else ()), *overrides]
    if run_dir is not None:
        args.append(f"hydra.run.dir={run_dir}")
    return subprocess.run(command(*args, nproc=nproc, script=script), cwd=REPO,
                          env=env or clean_env(), capture_output=True, text=True, timeout=timeout)


def output(result: subprocess.CompletedProcess) -> str:
    return result.stdout + result.stderr


def check_ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"exit {result.returncode}\n{output(result)[-6000:]}"
    return result


def metrics(run_dir: Path, name: str = "metrics.jsonl") -> dict[int, dict]:
    """metrics.jsonl as {step: record} (the last record of a step wins; event records skipped)."""
    lines = (run_dir / name).read_text().splitlines()
    return {record["step"]: record for record in map(json.loads, filter(None, lines))
            if "event" not in record}


def events(run_dir: Path) -> list[dict]:
    """The event records (branch, rollback) of metrics.jsonl, in order."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [record for record in map(json.loads, filter(None, lines)) if "event" in record]


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())
