"""Submit launch/slurm/train.sbatch after checking the settings against the cluster.

    python launch/slurm/submit.py --nodes 2 --gpus-per-node 8 --partition gpu --time 04:00:00 \\
        --account myproj -- +recipe=v3_fp8 model=small
    python launch/slurm/submit.py --cpu --nodes 2 --procs-per-node 1 -- trainer.max_steps=20

Everything after `--` is a Hydra override for launch/train.py. Each flag can also come from the
environment (FP8TRAIN_NODES, FP8TRAIN_GPUS_PER_NODE, FP8TRAIN_PARTITION, FP8TRAIN_TIME,
FP8TRAIN_ACCOUNT, FP8TRAIN_CPU=1); the command line wins.

Why a wrapper: sbatch accepts a job that can never run (a partition with no GPUs, more nodes than
the partition has) and leaves it pending forever, or runs it and fails minutes later. This checks,
before anything is queued: node and GPU counts, that a GPU run asks for GPUs and lands on a
partition that has them, that the partition exists (`sinfo -h -o %P`), that the time limit leaves
room for the preemption warning, and that sbatch exists (fp8train/sweep/slurm_checks.py).
Each error names the bad value and the fix.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from fp8train.sweep.slurm_checks import (SlurmSettingsError, check_counts, check_partition,
                                         check_time)

REPO = Path(__file__).resolve().parents[2]
TEMPLATE = REPO / "launch" / "slurm" / "train.sbatch"


@dataclass(frozen=True)
class JobSettings:
    nodes: int = 1
    gpus_per_node: int = 0
    cpu: bool = False
    procs_per_node: int = 1
    partition: str | None = None
    time: str = "01:00:00"
    account: str | None = None
    cpus_per_task: int | None = None
    job_name: str = "fp8train"
    run_dir: Path | None = None
    signal_seconds: int = 120
    overrides: list[str] = field(default_factory=list)

    @property
    def workers_per_node(self) -> int:
        return self.procs_per_node if self.cpu else self.gpus_per_node


def check_request(s: JobSettings) -> None:
    """Checks that need no cluster: counts, GPU/CPU mode, time limit, overrides."""
    if s.cpu and s.gpus_per_node > 0:
        raise SlurmSettingsError(f"--cpu with --gpus-per-node {s.gpus_per_node}: pick one; drop --cpu "
                                 "for a GPU run or --gpus-per-node for a CPU (gloo) run")
    if not s.cpu and s.gpus_per_node < 1:
        raise SlurmSettingsError(f"--gpus-per-node={s.gpus_per_node} for a GPU run: pass --gpus-per-node N "
                                 "(N >= 1), or --cpu for a CPU run over gloo")
    workers_flag = "--procs-per-node" if s.cpu else "--gpus-per-node"
    check_counts(s.nodes, s.workers_per_node, gpu_run=not s.cpu, names=("--nodes", workers_flag))
    if s.signal_seconds < 10:
        raise SlurmSettingsError(f"--signal-seconds {s.signal_seconds}: leave at least 10 s to checkpoint")
    check_time(s.time, s.signal_seconds)
    for override in s.overrides:
        if override.lstrip("+").startswith("hydra.run.dir="):
            raise SlurmSettingsError(f"override {override!r}: the job owns the run directory; use --run-dir")
        if override in ("-m", "--multirun"):
            raise SlurmSettingsError(f"{override!r}: a sweep is not one job; run "
                                     "`python launch/train.py -m hydra/launcher=slurm ...` instead")


def sbatch_command(s: JobSettings, partition: str, log_dir: Path) -> list[str]:
    cmd = ["sbatch", "--parsable", f"--nodes={s.nodes}", "--ntasks-per-node=1",
           f"--time={s.time}", f"--job-name={s.job_name}", f"--partition={partition}",
           f"--signal=B:USR1@{s.signal_seconds}", f"--chdir={REPO}",
           f"--output={log_dir / 'slurm-%j.out'}"]
    if s.account:
        cmd.append(f"--account={s.account}")
    if not s.cpu:
        cmd.append(f"--gpus-per-node={s.gpus_per_node}")
    if s.cpus_per_task:
        cmd.append(f"--cpus-per-task={s.cpus_per_task}")
    return [*cmd, str(TEMPLATE), *s.overrides]


def submit(s: JobSettings) -> str:
    """Validate, then sbatch; returns the job id."""
    check_request(s)
    partition = check_partition(s.partition, s.nodes, gpu_run=not s.cpu)
    log_dir = s.run_dir or REPO / "runs"
    log_dir.mkdir(parents=True, exist_ok=True)  # Slurm cannot create the --output folder
    env = dict(os.environ, FP8TRAIN_NPROC_PER_NODE=str(s.workers_per_node), FP8TRAIN_REPO=str(REPO),
               FP8TRAIN_SHUTDOWN_TIMEOUT=str(max(s.signal_seconds - 10, 10)))
    if s.run_dir:
        env["FP8TRAIN_RUN_DIR"] = str(s.run_dir)
    done = subprocess.run(sbatch_command(s, partition, log_dir), capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SlurmSettingsError(f"sbatch refused the job: {done.stderr.strip()}")
    return done.stdout.strip().split(";")[0]


def parse_args(argv: list[str]) -> tuple[JobSettings, bool]:
    env = os.environ.get
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                usage="%(prog)s [options] -- [hydra overrides]")
    p.add_argument("--nodes", type=int, default=int(env("FP8TRAIN_NODES", 1)))
    p.add_argument("--gpus-per-node", type=int, default=int(env("FP8TRAIN_GPUS_PER_NODE", 0)))
    p.add_argument("--cpu", action="store_true", default=env("FP8TRAIN_CPU", "0") == "1",
                   help="CPU run over gloo (CI); workers per node from --procs-per-node")
    p.add_argument("--procs-per-node", type=int, default=1)
    p.add_argument("--partition", default=env("FP8TRAIN_PARTITION"))
    p.add_argument("--time", default=env("FP8TRAIN_TIME", "01:00:00"))
    p.add_argument("--account", default=env("FP8TRAIN_ACCOUNT"))
    p.add_argument("--cpus-per-task", type=int, default=None, help="cores for each node's torchrun")
    p.add_argument("--job-name", default="fp8train")
    p.add_argument("--run-dir", type=Path, default=None, help="default: runs/slurm-<job id>")
    p.add_argument("--signal-seconds", type=int, default=120, help="USR1 this long before the limit")
    p.add_argument("--parsable", action="store_true", help="print only the job id")
    args, overrides = p.parse_known_args(argv)
    overrides = [o for o in overrides if o != "--"]
    unknown = [o for o in overrides if o.startswith("--")]
    if unknown:
        p.error(f"unknown option(s) {unknown}; Hydra overrides go after `--`")
    run_dir = args.run_dir.resolve() if args.run_dir else None
    settings = JobSettings(args.nodes, args.gpus_per_node, args.cpu, args.procs_per_node, args.partition,
                           args.time, args.account, args.cpus_per_task, args.job_name, run_dir,
                           args.signal_seconds, overrides)
    return settings, args.parsable


def main(argv: list[str] | None = None) -> int:
    settings, parsable = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        job_id = submit(settings)
    except SlurmSettingsError as error:
        print(f"submit.py: error: {error}", file=sys.stderr)
        return 2
    run_dir = settings.run_dir or REPO / "runs" / f"slurm-{job_id}"
    print(job_id if parsable else f"submitted job {job_id}: run dir {run_dir}, "
          f"log {(settings.run_dir or REPO / 'runs') / f'slurm-{job_id}.out'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
