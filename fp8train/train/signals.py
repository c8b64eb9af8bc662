"""Preemption: stop cleanly, on the same step on every rank, when asked to.

Slurm sends SIGTERM before killing a job (or SIGUSR1 ahead of time with `--signal=USR1@90`);
torchrun forwards SIGTERM to its workers. The handler only sets a flag: doing real work inside
a signal handler (collectives, file writes) could deadlock or corrupt state. The training loop
polls `should_stop()` once per optimizer step; it all-reduces the flag with MAX, so if any rank
was signalled all ranks see True on the same step, save one checkpoint together, write
<run_dir>/PREEMPTED and exit 0. The Slurm script requeues when it finds that file.
"""

from __future__ import annotations

import signal

import torch

from fp8train.train import distributed

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionFlag:
    """Installs handlers for STOP_SIGNALS on construction; `restore()` puts the old ones back."""

    def __init__(self, device: torch.device):
        self.device = device
        self.received: int | None = None
        self._previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def should_stop(self) -> bool:
        """Collective: True on every rank when any rank received a stop signal."""
        return distributed.any_rank(self.received is not None, self.device)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
