"""Branches: resuming from an older checkpoint than the newest abandons what came after it.

A run folder holds one live trajectory. Loading checkpoint C while the folder also holds newer
tags (a resume from an older path, a resume=auto that fell back past a damaged checkpoint, a
rollback after divergence) starts a new branch at C. Without care a later resume=auto would
return to the abandoned trajectory, and metrics.jsonl would mix the two. So, on rank 0:

    1. `latest` is pointed at C (atomically)              a crash after this resumes from C
    2. every complete tag newer than C moves to            renamed, never deleted, and out of
       checkpoints/abandoned/<NNN>_after_<C>/              reach of `latest` and of pruning

A crash between 1 and 2 leaves newer tags beside `latest` = C; the next resume from C moves
them then. The trainer writes the returned record to metrics.jsonl (an "event" record); the
logger moves the abandoned branch's records past C to metrics.discarded.jsonl, so
metrics.jsonl holds the live branch only, and readers (fp8train/sweep/runs.py) skip event
records and drop any record past a branch point that precedes it.
"""

from __future__ import annotations

import os
from pathlib import Path

from fp8train.train.checkpoint import LATEST_FILE, CheckpointRef, atomic_write, complete_tags, step_of

ABANDONED_DIR = "abandoned"


def newer_tags(checkpoints_dir: Path, step: int) -> list[str]:
    """Complete tags with a step above `step`, oldest first. (An incomplete one is a torn write,
    not part of any branch: the next save of that step overwrites it, or pruning deletes it.)"""
    return [tag for tag in complete_tags(checkpoints_dir) if step_of(tag) > step]


def _branch_folder(checkpoints_dir: Path, ref: CheckpointRef) -> Path:
    """abandoned/<NNN>_after_<tag>, NNN one more than the branches set aside so far."""
    parent = checkpoints_dir / ABANDONED_DIR
    number = len(list(parent.iterdir())) + 1 if parent.is_dir() else 1
    while any(parent.glob(f"{number:03d}_*")):
        number += 1
    return parent / f"{number:03d}_after_{ref.tag}"


def start_branch(checkpoints_dir: Path, ref: CheckpointRef, reason: str) -> dict | None:
    """Rank 0: make `ref` the head of this run's checkpoints (see the module docstring).

    Returns the event record for metrics.jsonl when tags were set aside, else None. A checkpoint
    of another run folder starts no branch here (that folder is left alone)."""
    if ref.load_dir.resolve() != checkpoints_dir.resolve():
        return None
    latest = checkpoints_dir / LATEST_FILE
    if not latest.is_file() or latest.read_text().strip() != ref.tag:
        atomic_write(latest, ref.tag)
    newer = newer_tags(checkpoints_dir, ref.step)
    if not newer:
        return None
    folder = _branch_folder(checkpoints_dir, ref)
    folder.mkdir(parents=True)
    for tag in newer:
        os.replace(checkpoints_dir / tag, folder / tag)  # a rename: atomic per tag
    return {"event": "branch", "step": ref.step, "checkpoint_step": ref.step,
            "checkpoint": ref.tag, "reason": reason, "abandoned": newer, "moved_to": str(folder)}
