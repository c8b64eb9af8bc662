"""One output folder per launch: the run id is the same on every rank and differs between runs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest

from fp8train.train.run_id import compute_launch_id, compute_run_id, process_start_time
from tests.train.helpers import REPO, clean_env, command, launch, output

PRINT_IDS = REPO / "tests" / "train" / "print_run_id.py"


def test_precedence_user_then_slurm_then_torchrun():
    env = {"FP8TRAIN_RUN_ID": "mine", "SLURM_JOB_ID": "77", "TORCHELASTIC_RUN_ID": "abc"}
    assert compute_run_id(env) == "mine"
    del env["FP8TRAIN_RUN_ID"]
    assert compute_run_id(env) == "slurm-77"
    array_task = {**env, "SLURM_ARRAY_JOB_ID": "70", "SLURM_ARRAY_TASK_ID": "3"}
    assert compute_run_id(array_task) == "slurm-70_3"
    del env["SLURM_JOB_ID"]
    assert compute_run_id(env) == "torchrun-abc"


def test_plain_process_gets_a_timestamp_and_its_pid():
    run_id = compute_run_id({"TORCHELASTIC_RUN_ID": "none"})
    assert re.fullmatch(rf"\d{{8}}-\d{{6}}-pid{os.getpid()}", run_id)


def test_process_start_time_is_this_process():
    started = process_start_time(os.getpid())
    assert started is not None and 0 <= time.time() - started < 3600


def _ids_of_children(count: int, **env: str) -> set[str]:
    """Start `count` sibling processes (same parent: this one) as a launcher would."""
    children = [subprocess.run([sys.executable, str(PRINT_IDS)], env=clean_env(**env),
                               capture_output=True, text=True, check=True)
                for _ in range(count)]
    return {re.search(r"run_id=(\S+)", c.stdout).group(1) for c in children}


def test_sibling_ranks_share_the_parent_derived_id():
    ids = _ids_of_children(2, LOCAL_RANK="0")
    assert len(ids) == 1 and f"-agent{os.getpid()}" in ids.pop()


def test_unlaunched_processes_get_distinct_ids():
    assert len(_ids_of_children(2)) == 2


@pytest.mark.parametrize("drop_elastic_id", ["", "1"])
def test_two_torchrun_ranks_agree(drop_elastic_id):
    result = subprocess.run(command(nproc=2, script=PRINT_IDS), cwd=REPO, capture_output=True,
                            text=True, env=clean_env(DROP_ELASTIC_ID=drop_elastic_id), timeout=120)
    assert result.returncode == 0, result.stderr
    lines = re.findall(r"rank=(\d) run_id=(\S+) launch_id=(\S+)", result.stdout)
    assert sorted(rank for rank, _, _ in lines) == ["0", "1"], result.stdout
    assert len({run for _, run, _ in lines}) == 1 and len({lid for _, _, lid in lines}) == 1
    expected = "-agent" if drop_elastic_id else "torchrun-"
    assert expected in lines[0][1]


def test_launch_id_ignores_the_run_level_ids():
    """Resuming under the same FP8TRAIN_RUN_ID / Slurm job is a new launch with its own record."""
    run_level = {"FP8TRAIN_RUN_ID": "mine", "SLURM_JOB_ID": "77"}
    assert compute_launch_id(run_level) == compute_launch_id({}) != compute_run_id(run_level)


def test_multirun_runs_each_job_in_its_own_numbered_folder(tmp_path):
    """Hydra's basic launcher runs the jobs one after another in one process (one process group)."""
    result = launch(None, "+recipe=bf16,hybrid", "trainer.max_steps=2",
                    f"hydra.sweep.dir={tmp_path}", multirun=True)
    assert result.returncode == 0, output(result)[-4000:]
    jobs = sorted(p.name for p in tmp_path.iterdir() if p.is_dir())
    assert jobs == ["0_bf16", "1_hybrid"]  # job number + recipe name (overrides live in .hydra/)
    assert all((tmp_path / name / "summary.json").is_file() for name in jobs)
