"""Fail fast on Slurm settings that cannot work, before anything is queued.

sbatch happily accepts a job that will never run (more nodes than the partition has, GPUs on a
partition without any) and leaves it pending forever, or starts it and fails minutes later.
Both the sbatch wrapper (launch/slurm/submit.py) and the Hydra Slurm launcher
(conf/hydra/launcher/slurm.yaml, through fp8train.sweep.submitit_env) run these checks first.
Each error names the bad value, what was expected, and the fix.
"""

from __future__ import annotations

import re
import shutil
import subprocess

_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


class SlurmSettingsError(ValueError):
    """A Slurm setting that cannot work; the message says which and how to fix it."""


def time_limit_seconds(value: str) -> int | None:
    """Seconds in a Slurm time limit (M, M:S, H:M:S, D-H, D-H:M, D-H:M:S); None = unlimited."""
    if value.upper() in ("UNLIMITED", "INFINITE"):
        return None
    match = _TIME.match(value)
    if not match:
        raise SlurmSettingsError(f"time limit {value!r} is not in a Slurm format; "
                                 "use e.g. 30 (minutes), 04:00:00 or 1-12:00:00")
    days, first, second, third = (int(g) if g else 0 for g in match.groups())
    if match.group(1):  # D-H[:M[:S]]
        return ((days * 24 + first) * 60 + second) * 60 + third
    if match.group(4):  # H:M:S
        return (first * 60 + second) * 60 + third
    return first * 60 + second  # M or M:S


def check_counts(nodes: int, workers_per_node: int, gpu_run: bool,
                 names: tuple[str, str] = ("nodes", "gpus_per_node")) -> None:
    """At least one node and one worker per node; a GPU run needs GPUs. `names` are the
    caller's spellings of the two settings (command-line flags, Hydra keys), used in errors."""
    nodes_name, workers_name = names
    if nodes < 1:
        raise SlurmSettingsError(f"{nodes_name}={nodes}: a job needs at least 1 node")
    if gpu_run and workers_per_node < 1:
        raise SlurmSettingsError(f"{workers_name}={workers_per_node} for a GPU run: ask for at least "
                                 "1 GPU per node, or make it a CPU run (gloo)")
    if workers_per_node < 1:
        raise SlurmSettingsError(f"{workers_name}={workers_per_node}: a run needs at least 1 "
                                 "process per node")


def check_time(limit: str, warning_s: int) -> None:
    """The time limit must leave room for the preemption warning signal."""
    seconds = time_limit_seconds(limit)
    if seconds is not None and seconds <= warning_s:
        raise SlurmSettingsError(f"time limit {limit} ({seconds} s) is not longer than the preemption "
                                 f"warning sent {warning_s} s before the end; raise the limit or "
                                 "shorten the warning")


def require_tools(*tools: str) -> None:
    for tool in tools:
        if shutil.which(tool) is None:
            raise SlurmSettingsError(f"{tool} not found on PATH: submit from a Slurm login node "
                                     "(local test cluster: bash .ci/slurm/setup.sh)")


def sinfo(*args: str) -> list[str]:
    """Lines of `sinfo -h ARGS`."""
    done = subprocess.run(["sinfo", "-h", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise SlurmSettingsError(f"sinfo failed ({done.stderr.strip()}); is slurmctld reachable?")
    return [line.strip() for line in done.stdout.splitlines() if line.strip()]


def check_partition(partition: str | None, nodes: int, gpu_run: bool) -> str:
    """The partition exists, has `nodes` nodes and GPUs if needed; returns its name."""
    require_tools("sbatch", "sinfo")
    listed = sinfo("-o", "%P")  # the default partition carries a trailing '*'
    names = [p.rstrip("*") for p in listed]
    default = next((p.rstrip("*") for p in listed if p.endswith("*")), None)
    chosen = partition or default
    if chosen is None:
        raise SlurmSettingsError(f"no partition given and the cluster has no default; choose one of {names}")
    if chosen not in names:
        raise SlurmSettingsError(f"partition {chosen!r} does not exist; choose one of {names}")
    node_count = sum(int(n) for n in sinfo("-p", chosen, "-o", "%D"))
    if nodes > node_count:
        raise SlurmSettingsError(f"{nodes} nodes asked but partition {chosen!r} has {node_count}")
    if gpu_run and all("gpu" not in gres for gres in sinfo("-p", chosen, "-o", "%G")):
        raise SlurmSettingsError(f"a GPU run on partition {chosen!r}, which has no GPUs (sinfo Gres "
                                 "lists no gpu); choose a GPU partition or make it a CPU run")
    return chosen
