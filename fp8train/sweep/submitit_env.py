"""Hydra callback for Slurm sweeps: check the launcher settings, pin one sweep folder, and give
each task of a submitit job the torch.distributed environment torchrun would set.

The Hydra submitit launcher (conf/hydra/launcher/slurm.yaml) starts `tasks_per_node x nodes`
copies of the job function per sweep job, one per Slurm task, with no torchrun in between. The
trainer initialises torch.distributed from RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT (fp8train/train/distributed.py); without them every task would believe it is a
one-process run, and all of them would train the same model into the same folder.

`SubmititDistributedEnv` is a Hydra callback: Hydra calls `on_job_start` inside each task, after
the job's config and run folder are set and before the job function runs. It exports the
variables from Slurm's (SLURM_PROCID, SLURM_NTASKS, SLURM_JOB_NODELIST, ...) through submitit's
own `TorchDistributedEnvironment`: rank = SLURM_PROCID, master = first node of the job, port
derived from the job id (the same in every task of a job, different between jobs of an array).
Nothing happens outside a submitit job or when a launcher already set RANK (torchrun).

Preemption and time limits (`on_job_start` / `on_job_end`): submitit asks Slurm for SIGUSR2
`signal_delay_s` before the limit, and its handler requeues the job at once and exits the task,
so the work since the last periodic checkpoint would be lost. `DeferredRequeue` takes over
SIGUSR2: it hands the signal to the trainer's stop handler (the one behind SIGUSR1, see
fp8train/train/signals.py), the trainer saves a checkpoint and returns, and only then, in
`on_job_end`, submitit's own handler runs: it requeues the job (counting timeouts against
max_num_timeout) and exits without a result, so the submitting process keeps waiting for the
requeued attempt, which resumes from that checkpoint.

`on_multirun_start` runs once, in the process that submits the sweep:
- it checks hydra.launcher (nodes, tasks/GPUs per node, partition, time) against the cluster
  (fp8train/sweep/slurm_checks.py), so a bad setting fails before any job is queued;
- it exports FP8TRAIN_RUN_ID (the sweep's run id) to the jobs, which inherit the submitter's
  environment. Hydra re-resolves `hydra.sweep.dir: multirun/${run_id:}` inside every job, where
  SLURM_JOB_ID would otherwise give each job its own sweep folder.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

from hydra.experimental.callback import Callback

from fp8train.sweep.slurm_checks import SlurmSettingsError, check_counts, check_partition

TORCH_DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def in_submitit_slurm_job(environ: dict | None = None) -> bool:
    """submitit's Slurm jobs export SUBMITIT_EXECUTOR=slurm in their sbatch script."""
    env = os.environ if environ is None else environ
    return env.get("SUBMITIT_EXECUTOR") == "slurm" and "SLURM_PROCID" in env


def export_torch_distributed_env() -> dict[str, str]:
    """Export the torch.distributed variables for this submitit task; returns what was set."""
    if not in_submitit_slurm_job() or "RANK" in os.environ:
        return {}
    from submitit.helpers import TorchDistributedEnvironment

    # set_cuda_visible_devices=False: the trainer selects cuda:LOCAL_RANK itself, which would
    # point past the end if each task saw only its own GPU.
    TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    return {name: os.environ[name] for name in TORCH_DIST_VARS}


class DeferredRequeue:
    """SIGUSR2 handler: checkpoint through the trainer first, let submitit requeue afterwards."""

    def __init__(self, submitit_handler):
        self.submitit_handler = submitit_handler
        self.pending: int | None = None

    def __call__(self, signum, frame) -> None:
        trainer_stop = signal.getsignal(signal.SIGUSR1)
        if callable(trainer_stop):  # the training loop is running: stop it with a checkpoint
            self.pending = signum
            trainer_stop(signal.SIGUSR1, frame)
        else:  # nothing that could checkpoint (still starting up): requeue right away
            self.submitit_handler(signum, frame)

    def requeue_if_signalled(self) -> None:
        """After the job function returned; submitit's handler requeues and raises SystemExit."""
        if self.pending is not None:
            self.submitit_handler(self.pending, None)


def check_launcher(launcher: Any) -> None:
    """Validate a hydra.launcher node of the submitit Slurm launcher before submission."""
    gpus = launcher.get("gpus_per_node") or 0
    tasks = launcher.get("tasks_per_node")
    check_counts(launcher.get("nodes"), tasks, gpu_run=False,
                 names=("hydra.launcher.nodes", "hydra.launcher.tasks_per_node"))
    if gpus and tasks != gpus:
        raise SlurmSettingsError(f"hydra.launcher.tasks_per_node={tasks} with gpus_per_node={gpus}: each task "
                         f"drives one GPU; set hydra.launcher.tasks_per_node={gpus}")
    timeout_min, delay_s = launcher.get("timeout_min"), launcher.get("signal_delay_s") or 0
    if timeout_min * 60 <= delay_s:
        raise SlurmSettingsError(f"hydra.launcher.timeout_min={timeout_min} ({timeout_min * 60} s) is not "
                                 f"longer than hydra.launcher.signal_delay_s={delay_s}, the preemption "
                                 "warning before the limit; raise timeout_min or lower signal_delay_s")
    check_partition(launcher.get("partition"), launcher.get("nodes"), gpu_run=gpus > 0)


class SubmititDistributedEnv(Callback):
    """Hydra callback: `hydra.callbacks.submitit_dist_env._target_` points here."""

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        launcher = config.hydra.launcher
        if str(launcher.get("_target_", "")).endswith("SlurmLauncher"):
            try:
                check_launcher(launcher)
            except SlurmSettingsError as error:
                # Hydra turns a callback's exceptions into warnings and carries on submitting;
                # SystemExit is not an Exception, so it stops the sweep here.
                print(f"fp8train: error: {error}", file=sys.stderr)
                raise SystemExit(2) from error
        from fp8train.train.run_id import ENV_RUN_ID, run_id

        os.environ[ENV_RUN_ID] = run_id()  # the value ${run_id:} has in this process

    def __init__(self) -> None:
        self.deferred: DeferredRequeue | None = None

    def on_job_start(self, config: Any, **kwargs: Any) -> None:
        try:
            exported = export_torch_distributed_env()
        except Exception as error:  # Hydra would only warn and run every task as rank 0
            print(f"fp8train: error: cannot set up torch.distributed for this task: {error}", file=sys.stderr)
            raise SystemExit(1) from error
        if not exported:
            return
        print(f"fp8train.sweep.submitit_env: task rank {exported['RANK']}/{exported['WORLD_SIZE']}, "
              f"master {exported['MASTER_ADDR']}:{exported['MASTER_PORT']}", flush=True)
        submitit_handler = signal.getsignal(signal.SIGUSR2)
        if callable(submitit_handler):
            self.deferred = DeferredRequeue(submitit_handler)
            signal.signal(signal.SIGUSR2, self.deferred)

    def on_job_end(self, config: Any, **kwargs: Any) -> None:
        if self.deferred is not None:
            self.deferred.requeue_if_signalled()  # SystemExit passes Hydra's callback guard
