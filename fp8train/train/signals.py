"""Preemption: stop cleanly, on the same step on every rank, when asked to.

Slurm sends SIGTERM before killing a job (or SIGUSR1 ahead of time with `--signal=USR1@90`);
torchrun forwards SIGTERM to its workers. The handler only sets a flag: doing real work inside
a signal handler (collectives, file writes) could deadlock or corrupt state. The training loop
polls `should_stop()` once per optimizer step; it all-reduces the flag with MAX, so if any rank
was signalled all ranks see True on the same step, save one checkpoint together, write
<run_dir>/PREEMPTED and exit 0. The Slurm script requeues when it finds that file.

A signal can also come too late to stop anything: after the last step's poll, or after the run
has written its final checkpoint and summary, while the process is tearing down (DeepSpeed, the
process group, the interpreter: about a second on a CPU). Restoring the default handler at that
point would let it kill a finished run with exit -15 (143 under a shell), and Slurm would call
the job failed. So the process's job function ends with `stand_down()` instead of `restore()`:
a handler that only prints one line stays installed until the process exits, which then exits
with the run's own status (0 for a finished run). Once the interpreter's exit hooks run, the
signals are ignored (SIG_IGN) without the line: Python puts the default handler back in place
of a Python one while it tears down, and C++ teardown (torch, gloo) can take a second after
that. A process stuck in teardown is still stopped by SIGKILL (Slurm sends it after KillWait).
"""

from __future__ import annotations

import atexit
import os
import signal

import torch

from fp8train.train import distributed

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def late_signal_line(signum: int) -> str:
    return (f"fp8train: {signal.Signals(signum).name} received after the run had ended: nothing "
            f"left to save, the process exits with the run's own status (0 after a finished run)")


_LATE_LINES = {int(sig): (late_signal_line(sig) + "\n").encode() for sig in STOP_SIGNALS}


def _report_late_signal(signum, frame, write=os.write, lines=_LATE_LINES, error=OSError) -> None:
    """The handler after stand_down(). It may run while the interpreter tears down its modules,
    so everything it touches is bound at definition; os.write, because a print could re-enter a
    stream the signal interrupted."""
    try:
        write(2, lines[signum])
    except error:
        pass


def _ignore_stop_signals() -> None:
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


class PreemptionFlag:
    """Installs handlers for STOP_SIGNALS on construction; `restore()` puts the old ones back,
    `stand_down()` swaps in one that only reports (the run is over: see the module note)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.received: int | None = None
        self.stopping = False  # should_stop() said True: the loop acts on the signal
        self._previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def should_stop(self) -> bool:
        """Collective: True on every rank when any rank received a stop signal."""
        self.stopping = distributed.any_rank(self.received is not None, self.device)
        return self.stopping

    def restore(self) -> None:
        """For a Trainer inside a longer-lived process: the previous handlers again."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def stand_down(self) -> str | None:
        """The run is over (finished, preempted or failed with its own error) and the process
        is about to exit: later stop signals print one line and change nothing. Returns that
        line for a signal that came after the last poll (it was not acted on), else None."""
        for sig in STOP_SIGNALS:
            signal.signal(sig, _report_late_signal)
        atexit.unregister(_ignore_stop_signals)  # once, however many runs this process had
        atexit.register(_ignore_stop_signals)
        if self.received is not None and not self.stopping:
            return late_signal_line(self.received)
        return None
