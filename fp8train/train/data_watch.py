"""Stop a run whose dataset files change under it.

The token files are memory-mapped: a file rewritten in place changes the batches of a running
job mid-stream, and a file replaced by a new one is read by the next resume. Either way the
steps after the change are not the run that was configured, and a checkpoint written then would
carry the mix forward. So the trainer checks (size, mtime, inode) of meta.json and every .bin
it reads before each step and before each checkpoint; all ranks agree (a MAX all-reduce), and
a change stops the run with a TrainingError naming the file. The last checkpoint predates the
change: restore the file (or prepare a new run) and resume.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from fp8train.train import distributed
from fp8train.train.errors import TrainingError


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return None
    return info.st_size, info.st_mtime_ns, info.st_ino


def _describe(path: Path, before, after) -> str:
    if after is None:
        return f"{path} was deleted"
    if before[2] != after[2]:
        return f"{path} was replaced by another file"
    if before[0] != after[0]:
        return f"{path} was modified ({before[0]} -> {after[0]} bytes)"
    return f"{path} was modified (same size, new modification time)"


class DataWatch:
    """Remembers the dataset files' stamps at start; `check()` raises if any changed."""

    def __init__(self, files: list[Path], device: torch.device):
        self.device = device
        self.stamps = {Path(path): _stamp(Path(path)) for path in files}

    def changes(self) -> list[str]:
        return [_describe(path, stamp, now) for path, stamp in self.stamps.items()
                if (now := _stamp(path)) != stamp]

    def check(self, when: str) -> None:
        """Collective: TrainingError on every rank if a file changed on any."""
        changed = self.changes()
        if distributed.any_rank(bool(changed), self.device):
            found = [c for part in distributed.gather_objects(changed) for c in part]
            raise TrainingError(
                f"the dataset changed while the run was reading it: {'; '.join(dict.fromkeys(found))}. "
                f"Stopped {when} without saving (every checkpoint predates the change): restore "
                f"the file and continue with trainer.resume=auto, or prepare the new data into "
                f"another folder and start a new run")
