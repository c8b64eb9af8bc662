"""One run id per launch, identical on every rank: the name of the run's output directory.

Under torchrun every rank executes the Hydra main function, and Hydra's default timestamped
directory is computed per process (two ranks can land in two folders). conf/config.yaml therefore
sets `hydra.run.dir: runs/${run_id:}`, and this resolver derives the id from something all ranks
of one launch share, in order of preference:

1. FP8TRAIN_RUN_ID                       set by the user (reuse it to resume a run in place)
2. SLURM_JOB_ID (+ array task id)        shared by all tasks of a job, kept across requeues,
                                         so a requeued job finds its checkpoints again
3. TORCHELASTIC_RUN_ID, unless "none"    torchrun's --rdzv_id (a uuid with --standalone)
4. the torchrun agent itself             all local ranks share the parent process: its pid and
                                         its start time (from /proc/<ppid>/stat) name it
5. a timestamp plus our pid              a plain single-process run

The value is computed once per process and cached, so every interpolation sees the same id.

`${launch_id:}` names one launch (attempt) inside a run folder, shared by the local ranks of that
launch: a resumed or requeued run keeps its run id but gets a new launch id. Hydra's record of
the composed config goes to <run_dir>/.hydra/<launch_id>/, so a later launch into the same
folder (a resume, or a rejected config) never overwrites an earlier launch's record.
"""

from __future__ import annotations

import functools
import os
import time
from datetime import datetime
from pathlib import Path

ENV_RUN_ID = "FP8TRAIN_RUN_ID"
_LAUNCHER_VARS = ("LOCAL_RANK", "TORCHELASTIC_RESTART_COUNT")


def _stamp(seconds: float) -> str:
    return datetime.fromtimestamp(seconds).strftime("%Y%m%d-%H%M%S")


def _slurm_id(env: dict) -> str | None:
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"slurm-{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    if env.get("SLURM_JOB_ID"):
        return f"slurm-{env['SLURM_JOB_ID']}"
    return None


def process_start_time(pid: int, proc: Path = Path("/proc")) -> float | None:
    """Wall-clock start time of a process, from field 22 of /proc/<pid>/stat (clock ticks)."""
    try:
        stat = (proc / str(pid) / "stat").read_text()
        boot_line = next(line for line in (proc / "stat").read_text().splitlines()
                         if line.startswith("btime "))
    except (OSError, StopIteration):
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    fields_after_name = stat.rsplit(")", 1)[1].split()
    start_ticks = int(fields_after_name[19])  # field 22 overall; fields 3.. start at index 0
    return int(boot_line.split()[1]) + start_ticks / os.sysconf("SC_CLK_TCK")


def _launcher_id(env: dict) -> str | None:
    """Derived from the torchrun agent (our parent) when a launcher started us."""
    if not any(var in env for var in _LAUNCHER_VARS):
        return None
    parent = os.getppid()
    started = process_start_time(parent)
    if started is None:
        return None
    return f"{_stamp(started)}-agent{parent}"


def compute_run_id(env: dict | None = None) -> str:
    """The run id for this process's launch (see the module docstring for the order)."""
    env = dict(os.environ) if env is None else env
    if env.get(ENV_RUN_ID):
        return env[ENV_RUN_ID]
    slurm = _slurm_id(env)
    if slurm:
        return slurm
    elastic = env.get("TORCHELASTIC_RUN_ID", "none")
    if elastic and elastic != "none":
        return f"torchrun-{elastic}"
    return _launcher_id(env) or f"{_stamp(time.time())}-pid{os.getpid()}"


def compute_launch_id(env: dict | None = None) -> str:
    """This launch: the torchrun agent when there is one, else this process."""
    env = dict(os.environ) if env is None else env
    own_start = process_start_time(os.getpid()) or time.time()
    return _launcher_id(env) or f"{_stamp(own_start)}-pid{os.getpid()}"


@functools.lru_cache(maxsize=1)
def run_id() -> str:
    """The cached resolver behind `${run_id:}`."""
    return compute_run_id()


@functools.lru_cache(maxsize=1)
def launch_id() -> str:
    """The cached resolver behind `${launch_id:}`."""
    return compute_launch_id()


def register_run_id_resolver() -> None:
    from omegaconf import OmegaConf

    for name, resolver in (("run_id", run_id), ("launch_id", launch_id)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver)
