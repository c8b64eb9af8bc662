"""Bad Slurm settings fail before anything is queued, with a message naming the value and the fix.

The first group needs no cluster (the checks run before sinfo/sbatch are asked); the `slurm`
group checks against the live cluster, and the template's own checks run inside a real job.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from fp8train.sweep.slurm_checks import SlurmSettingsError, time_limit_seconds
from tests.slurm.helpers import LAUNCH, REPO, TEMPLATE, clean_env, submit, wait_for_job

CPU = ("--cpu", "--time", "10")


def refused(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 2, f"exit {result.returncode}\n{result.stdout}{result.stderr}"
    for needle in needles:
        assert needle in result.stderr, f"{needle!r} not in: {result.stderr}"
    assert "submitted job" not in result.stdout


@pytest.mark.parametrize("args, needles", [
    (("--nodes", "0", *CPU), ("--nodes=0", "at least 1 node")),
    (("--nodes", "-2", *CPU), ("--nodes=-2",)),
    (("--gpus-per-node", "0"), ("--gpus-per-node=0", "GPU run", "--cpu")),
    (("--cpu", "--gpus-per-node", "2"), ("--cpu with --gpus-per-node 2", "pick one")),
    (("--cpu", "--procs-per-node", "0"), ("--procs-per-node=0",)),
    (("--gpus-per-node", "1", "--time", "4h"), ("'4h'", "04:00:00")),
    (("--gpus-per-node", "1", "--time", "2", "--signal-seconds", "120"), ("120 s", "raise the limit")),
    ((*CPU, "--", "hydra.run.dir=/tmp/x"), ("hydra.run.dir", "--run-dir")),
    ((*CPU, "--", "-m", "+recipe=bf16"), ("'-m'", "hydra/launcher=slurm")),
])
def test_refused_without_asking_the_cluster(args, needles):
    refused(submit(*args), *needles)


def test_missing_sbatch(tmp_path):
    """PATH without Slurm's tools: the wrapper says where to submit from."""
    (tmp_path / "python3").symlink_to(sys.executable)
    refused(submit(*CPU, env=clean_env(PATH=str(tmp_path))), "sbatch not found on PATH", "setup.sh")


def test_time_formats():
    assert time_limit_seconds("30") == 1800
    assert time_limit_seconds("5:30") == 330
    assert time_limit_seconds("04:00:00") == 14400
    assert time_limit_seconds("1-12") == 36 * 3600
    assert time_limit_seconds("2-00:30:00") == 48 * 3600 + 1800
    assert time_limit_seconds("UNLIMITED") is None
    with pytest.raises(SlurmSettingsError, match="not in a Slurm format"):
        time_limit_seconds("1h")


@pytest.mark.slurm
def test_unknown_partition(cluster):
    refused(submit(*CPU, "--partition", "nosuchpart"), "'nosuchpart' does not exist", "debug")


@pytest.mark.slurm
def test_more_nodes_than_the_partition_has(cluster):
    refused(submit(*CPU, "--nodes", str(len(cluster) + 1)),
            f"{len(cluster) + 1} nodes asked", f"has {len(cluster)}")


@pytest.mark.slurm
def test_gpu_run_on_a_partition_without_gpus(cluster):
    refused(submit("--gpus-per-node", "1", "--time", "10"), "has no GPUs", "CPU run")


@pytest.mark.slurm
@pytest.mark.parametrize("override, needle", [
    ("hydra.launcher.partition=nosuchpart", "partition 'nosuchpart' does not exist"),
    ("hydra.launcher.nodes=0", "hydra.launcher.nodes=0"),
    ("hydra.launcher.gpus_per_node=2", "hydra.launcher.tasks_per_node=2"),
    ("hydra.launcher.timeout_min=1", "hydra.launcher.timeout_min=1 (60 s)"),
])
def test_hydra_slurm_launcher_refuses_before_submitting(cluster, submitit_plugin, tmp_path, override, needle):
    done = subprocess.run([sys.executable, str(LAUNCH), "-m", "hydra/launcher=slurm", override,
                           f"hydra.sweep.dir={tmp_path / 'sweep'}", "+recipe=bf16,v3_fp8"],
                          cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and needle in done.stderr, done.stderr[-3000:]
    assert not (tmp_path / "sweep").exists(), "nothing may be submitted"


@pytest.mark.slurm
@pytest.mark.parametrize("env, args, needle", [
    ({"FP8TRAIN_NPROC_PER_NODE": "0"}, (), "FP8TRAIN_NPROC_PER_NODE=0"),
    ({}, ("hydra.run.dir=/tmp/elsewhere",), "set FP8TRAIN_RUN_DIR instead"),
    ({"FP8TRAIN_REPO": "/nonexistent"}, (), "FP8TRAIN_REPO=/nonexistent has no launch/train.py"),
])
def test_template_checks_its_own_settings(cluster, tmp_path, env, args, needle):
    """sbatch on the template directly (no wrapper): the job stops at once with status 2."""
    log = tmp_path / "job.out"
    job_env = clean_env(FP8TRAIN_RUN_DIR=str(tmp_path / "run"), **env)
    done = subprocess.run(["sbatch", "--parsable", f"--output={log}", str(TEMPLATE), *args],
                          cwd=REPO, env=job_env, capture_output=True, text=True, check=True)
    info = wait_for_job(done.stdout.strip().split(";")[0], timeout=60, log=log)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", info
    assert needle in log.read_text(), log.read_text()
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
