"""Checkpoints that never destroy the previous good one, and resuming from them.

Layout under <run_dir>/checkpoints/:

    step_0000100/              one DeepSpeed tag: model states (incl. FP8 amax/scale buffers,
                               which are persistent buffers of the module), optimizer partitions,
                               LR scheduler, and our client_state (step, data position, RNG)
        fp8train_meta.json     written LAST, after every rank finished: marks the tag complete
                               and carries the model fingerprint checked before resuming
    latest                     the name of the newest complete tag (replaced atomically)

Writing order: every rank writes its files into the new tag folder -> barrier -> rank 0 writes
the meta file, then atomically replaces `latest` (write a temp file, fsync, os.replace), then
prunes tags beyond keep_last. A process killed at any point leaves `latest` naming a complete
tag: before the replace it still names the previous one, after it the new one. Incomplete tag
folders (no meta file) are never resumed from and are deleted by the next prune.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fp8train.train import distributed

CHECKPOINT_DIR = "checkpoints"
LATEST_FILE = "latest"
META_FILE = "fp8train_meta.json"
_TAG_PATTERN = re.compile(r"^step_(\d+)$")


def tag_for(step: int) -> str:
    return f"step_{step:07d}"


@dataclass(frozen=True)
class CheckpointRef:
    """A complete checkpoint: DeepSpeed's (load_dir, tag) plus our meta file's contents."""

    load_dir: Path
    tag: str
    meta: dict

    @property
    def path(self) -> Path:
        return self.load_dir / self.tag


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def read_checkpoint(load_dir: Path, tag: str) -> CheckpointRef:
    meta_path = load_dir / tag / META_FILE
    if not meta_path.is_file():
        raise ValueError(f"{load_dir / tag} is not a complete fp8train checkpoint (no {META_FILE}; "
                         f"its write was probably interrupted)")
    return CheckpointRef(load_dir, tag, json.loads(meta_path.read_text()))


def find_checkpoint(resume: str, run_dir: Path) -> CheckpointRef | None:
    """trainer.resume -> the checkpoint to load: auto (this run's latest, if any) | none | path.

    A path may name a checkpoints folder (its `latest` is used) or one tag folder. A run folder
    holds one trajectory: once it has checkpoints, starting over in it (none, or another run's
    checkpoint) is refused, because pruning would later delete the checkpoints already there.
    """
    own_latest = run_dir / CHECKPOINT_DIR / LATEST_FILE
    if resume == "auto":
        return _checkpoint_at(own_latest.parent) if own_latest.is_file() else None
    ref = None if resume == "none" else _checkpoint_at(Path(resume).expanduser())
    continues_own = ref is not None and ref.load_dir.resolve() == own_latest.parent.resolve()
    if own_latest.is_file() and not continues_own:
        raise ValueError(f"{run_dir} already holds checkpoints of an earlier run and they would be "
                         f"pruned; continue it with trainer.resume=auto, or write this run to "
                         f"another folder (FP8TRAIN_RUN_ID=... or hydra.run.dir=...)")
    return ref


def _checkpoint_at(path: Path) -> CheckpointRef:
    if (path / LATEST_FILE).is_file():
        return read_checkpoint(path, (path / LATEST_FILE).read_text().strip())
    if (path / META_FILE).is_file():
        return read_checkpoint(path.parent, path.name)
    raise ValueError(f"no fp8train checkpoint at {path} (expected a checkpoints folder with a "
                     f"'{LATEST_FILE}' file or a tag folder with {META_FILE}); use "
                     f"trainer.resume=auto, none or a checkpoint path")


def check_fingerprint(ref: CheckpointRef, fingerprint: dict) -> None:
    """Refuse a checkpoint of another model shape or recipe, naming both sides."""
    saved = ref.meta["fingerprint"]
    if saved["model"] != fingerprint["model"]:
        keys = sorted(set(saved["model"]) | set(fingerprint["model"]))
        diff = [k for k in keys if saved["model"].get(k) != fingerprint["model"].get(k)]
        theirs = ", ".join(f"{k}={saved['model'].get(k)}" for k in diff)
        ours = ", ".join(f"{k}={fingerprint['model'].get(k)}" for k in diff)
        raise ValueError(f"checkpoint {ref.path} holds a different model shape: it has {theirs} "
                         f"but this run builds {ours}. Use the checkpoint's model settings, or "
                         f"trainer.resume=none to start fresh")
    if saved["recipe"] != fingerprint["recipe"]:
        raise ValueError(f"checkpoint {ref.path} was trained with recipe {saved['recipe']!r} but "
                         f"this run uses {fingerprint['recipe']!r} (its FP8 scaling state does not "
                         f"carry over); add +recipe={saved['recipe']} or trainer.resume=none")


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Checkpointer:
    """Saves through the DeepSpeed engine and commits the tag (see the module docstring)."""

    def __init__(self, run_dir: Path, keep_last: int, fingerprint: dict, rank: int,
                 world_size: int):
        if keep_last < 1:
            raise ValueError(f"trainer.keep_last={keep_last} must be >= 1 (the newest checkpoint "
                             f"is the one a resume loads)")
        self.dir = run_dir / CHECKPOINT_DIR
        self.keep_last = keep_last
        self.fingerprint = fingerprint
        self.rank, self.world_size = rank, world_size

    def save(self, engine, step: int, client_state: dict) -> Path:
        """Collective: every rank calls it. Returns the tag folder."""
        tag = tag_for(step)
        rng_by_rank = distributed.gather_objects(rng_state())
        state = {**client_state, "step": step, "rng": rng_by_rank, "fingerprint": self.fingerprint}
        engine.save_checkpoint(str(self.dir), tag=tag, client_state=state, save_latest=False)
        distributed.barrier()  # every rank's files are on disk
        if self.rank == 0:  # the commit is a single-writer step by design
            self._commit(tag, step)
        distributed.barrier()
        return self.dir / tag

    def _commit(self, tag: str, step: int) -> None:
        meta = {"step": step, "tag": tag, "fingerprint": self.fingerprint,
                "world_size": self.world_size}
        _atomic_write(self.dir / tag / META_FILE, json.dumps(meta, indent=1))
        _atomic_write(self.dir / LATEST_FILE, tag)
        self._prune(keep_tag=tag)

    def _prune(self, keep_tag: str) -> None:
        """Keep the newest keep_last complete tags; delete older and incomplete ones."""
        tags = sorted((int(m.group(1)), p.name) for p in self.dir.iterdir()
                      if (m := _TAG_PATTERN.match(p.name)) and p.is_dir())
        complete = [name for _, name in tags if (self.dir / name / META_FILE).is_file()]
        keep = set(complete[-self.keep_last:]) | {keep_tag}
        for _, name in tags:
            if name not in keep:
                shutil.rmtree(self.dir / name, ignore_errors=True)

    def load(self, engine, ref: CheckpointRef) -> dict:
        """Load model, optimizer and LR schedule; restore this rank's RNG; return client_state."""
        _, client_state = engine.load_checkpoint(str(ref.load_dir), tag=ref.tag,
                                                 load_optimizer_states=True,
                                                 load_lr_scheduler_states=True)
        if client_state is None:
            raise ValueError(f"DeepSpeed could not load {ref.path}")
        rngs = client_state.get("rng") or []
        if len(rngs) == self.world_size:
            set_rng_state(rngs[self.rank])
        return client_state
