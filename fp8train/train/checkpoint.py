"""Checkpoints that never destroy the previous good one, and resuming from them.

Layout under <run_dir>/checkpoints/:

    step_0000100/              one DeepSpeed tag: model states (incl. FP8 amax/scale buffers,
                               which are persistent buffers of the module), optimizer partitions,
                               LR scheduler, and our client_state (step, data position, RNG)
        fp8train_meta.json     written LAST, after every rank finished: marks the tag complete,
                               carries the model fingerprint checked before resuming and the
                               manifest (bytes and sha256 of every file, integrity.py)
    latest                     the name of the newest complete tag (replaced atomically)
    abandoned/<branch>/        tags of a branch abandoned by resuming from an older tag
                               (branching.py): moved there, never deleted

Writing order: every rank writes its files into the new tag folder -> barrier -> the files are
hashed (split across ranks) -> rank 0 writes the meta file, then atomically replaces `latest`
(write a temp file, fsync, os.replace), then prunes tags beyond keep_last. A process killed at
any point leaves `latest` naming a complete tag: before the replace it still names the previous
one, after it the new one. Incomplete tag folders (no meta file) are never resumed from and are
deleted by the next prune. A write that fails (disk full) is reported on every rank as a
CheckpointWriteError naming the newest complete checkpoint; its incomplete folder is removed.
The trainer never saves non-finite weights (divergence.py), so every tag here is finite and
pruning, which keeps the newest keep_last, always keeps the newest finite checkpoint.

Finding a checkpoint to resume (`find_checkpoint`, in `resolve`) reads the meta file and checks
file sizes against the manifest; `Checkpointer.verified` re-hashes the files before loading. A
damaged checkpoint (corrupt meta, truncated or altered file) is an error naming the file and the
newest older good checkpoint; with trainer.resume=auto the run falls back to that one instead
and says so.
"""

from __future__ import annotations

import json
import os
import random
import re
import resource
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from fp8train.train import distributed, integrity
from fp8train.train.errors import TrainingError

CHECKPOINT_DIR = "checkpoints"
LATEST_FILE = "latest"
META_FILE = "fp8train_meta.json"
_TAG_PATTERN = re.compile(r"^step_(\d+)$")


def tag_for(step: int) -> str:
    return f"step_{step:07d}"


def step_of(tag: str) -> int | None:
    match = _TAG_PATTERN.match(tag)
    return int(match.group(1)) if match else None


class CheckpointWriteError(TrainingError):
    """A checkpoint could not be written (disk full, quota, I/O error); older ones are intact."""


@dataclass(frozen=True)
class CheckpointRef:
    """A complete checkpoint: DeepSpeed's (load_dir, tag) plus our meta file's contents.

    `skipped` lists the damaged newer checkpoints passed over to reach this one (resume=auto)."""

    load_dir: Path
    tag: str
    meta: dict
    skipped: tuple[str, ...] = ()

    @property
    def path(self) -> Path:
        return self.load_dir / self.tag

    @property
    def step(self) -> int:
        return int(self.meta.get("step", step_of(self.tag) or 0))


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # only left behind when the write failed


def read_checkpoint(load_dir: Path, tag: str) -> CheckpointRef:
    meta_path = load_dir / tag / META_FILE
    if not meta_path.is_file():
        raise ValueError(f"{load_dir / tag} is not a complete fp8train checkpoint (no {META_FILE}; "
                         f"its write was probably interrupted)")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{meta_path} is corrupt (not valid JSON: {error}), so the checkpoint "
                         f"{load_dir / tag} cannot be used") from error
    if not isinstance(meta, dict) or "fingerprint" not in meta:
        raise ValueError(f"{meta_path} is corrupt (no 'fingerprint' entry), so the checkpoint "
                         f"{load_dir / tag} cannot be used")
    return CheckpointRef(load_dir, tag, meta)


def complete_tags(load_dir: Path) -> list[str]:
    """Tags with a meta file, oldest first."""
    if not load_dir.is_dir():
        return []
    tags = [(step, p.name) for p in load_dir.iterdir()
            if (step := step_of(p.name)) is not None and (p / META_FILE).is_file()]
    return [name for _, name in sorted(tags)]


def _candidates(load_dir: Path, first: str | None) -> Iterator[str]:
    """`first`, then every older complete tag, newest first (all of them when `first` is None)."""
    newest = step_of(first) if first else None
    if first:
        yield first
    for tag in reversed(complete_tags(load_dir)):
        if newest is None or step_of(tag) < newest:
            yield tag


def _problems(load_dir: Path, tag: str, check: Callable) -> tuple[CheckpointRef | None, str]:
    """(ref, "") for a good checkpoint, (None, what is wrong with it) otherwise."""
    try:
        ref = read_checkpoint(load_dir, tag)
    except ValueError as error:
        return None, str(error)
    problems = check(ref)
    return (None, f"checkpoint {ref.path} is damaged: {'; '.join(problems)}") if problems else (ref, "")


def choose(load_dir: Path, first: str | None, check: Callable, fallback: bool) -> CheckpointRef:
    """`first` if it passes `check`; else, with `fallback`, the newest older checkpoint that does.

    Without fallback a damaged `first` is a ValueError naming the damage and the newest older
    good checkpoint, so the message says what to resume from instead."""
    damaged: list[str] = []
    for tag in _candidates(load_dir, first):
        ref, problem = _problems(load_dir, tag, check)
        if ref is None:
            damaged.append(problem)
        elif not damaged or fallback:
            return replace(ref, skipped=tuple(damaged))
        else:
            raise ValueError(f"{damaged[0]}. The newest older good checkpoint is {ref.path}: "
                             f"resume from it with trainer.resume={ref.path}")
    if not damaged:
        raise ValueError(f"no complete fp8train checkpoint in {load_dir}")
    raise ValueError(f"{'. '.join(damaged)}. No older good checkpoint exists in {load_dir}")


def size_check(ref: CheckpointRef) -> list[str]:
    return integrity.size_problems(ref.path, ref.meta.get(integrity.MANIFEST_KEY))


def has_checkpoints(checkpoints_dir: Path) -> bool:
    return (checkpoints_dir / LATEST_FILE).is_file() or bool(complete_tags(checkpoints_dir))


def latest_tag(load_dir: Path) -> str | None:
    """The tag `latest` names, or None when the file is missing or names no folder."""
    latest = load_dir / LATEST_FILE
    tag = latest.read_text().strip() if latest.is_file() else ""
    return tag if tag and (load_dir / tag).is_dir() else None


def find_checkpoint(resume: str, run_dir: Path) -> CheckpointRef | None:
    """trainer.resume -> the checkpoint to load: auto (this run's latest, if any) | none | path.

    A path may name a checkpoints folder (its `latest` is used) or one tag folder. A run folder
    holds one trajectory: once it has checkpoints, starting over in it (none, or another run's
    checkpoint) is refused, because pruning would later delete the checkpoints already there.
    Only auto falls back past a damaged checkpoint (the returned ref's `skipped` says which).
    """
    own = run_dir / CHECKPOINT_DIR
    if resume == "auto":
        return choose(own, latest_tag(own), size_check, fallback=True) if has_checkpoints(own) else None
    ref = None if resume == "none" else _checkpoint_at(Path(resume).expanduser())
    continues_own = ref is not None and ref.load_dir.resolve() == own.resolve()
    if has_checkpoints(own) and not continues_own:
        raise ValueError(f"{run_dir} already holds checkpoints of an earlier run and they would be "
                         f"pruned; continue it with trainer.resume=auto, or write this run to "
                         f"another folder (FP8TRAIN_RUN_ID=... or hydra.run.dir=...)")
    return ref


def _checkpoint_at(path: Path) -> CheckpointRef:
    if (path / LATEST_FILE).is_file():
        return choose(path, latest_tag(path), size_check, fallback=False)
    if (path / META_FILE).is_file():
        return choose(path.parent, path.name, size_check, fallback=False)
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
                 world_size: int, device: torch.device = torch.device("cpu")):
        if keep_last < 1:
            raise ValueError(f"trainer.keep_last={keep_last} must be >= 1 (the newest checkpoint "
                             f"is the one a resume loads)")
        self.dir = run_dir / CHECKPOINT_DIR
        self.keep_last = keep_last
        self.fingerprint = fingerprint
        self.rank, self.world_size, self.device = rank, world_size, device

    def save(self, engine, step: int, client_state: dict) -> Path:
        """Collective: every rank calls it. Returns the tag folder."""
        tag = tag_for(step)
        rng_by_rank = distributed.gather_objects(rng_state())
        state = {**client_state, "step": step, "rng": rng_by_rank, "fingerprint": self.fingerprint}
        self._on_every_rank(tag, _attempt(engine.save_checkpoint, str(self.dir), tag=tag,
                                          client_state=state, save_latest=False))
        manifest = integrity.build_manifest(self.dir / tag, self.rank, self.world_size, (META_FILE,))
        # the commit is a single-writer step by design
        self._on_every_rank(tag, _attempt(self._commit, tag, step, manifest) if self.rank == 0 else None)
        return self.dir / tag

    def _on_every_rank(self, tag: str, error: BaseException | None) -> None:
        """Collective: raise CheckpointWriteError on every rank if the write failed on any."""
        if not distributed.any_rank(error is not None, self.device):
            return
        if self.rank == 0 and not (self.dir / tag / META_FILE).is_file():
            shutil.rmtree(self.dir / tag, ignore_errors=True)  # never committed: free the space
        newest = latest_tag(self.dir)
        intact = f"{self.dir / newest} is the newest complete checkpoint" if newest else "no checkpoint was written before"
        raise CheckpointWriteError(
            f"could not write checkpoint {self.dir / tag}: {_describe(error)}; {_space(self.dir)}. "
            f"Nothing already saved was lost: {intact}. Free some space and continue with "
            f"trainer.resume=auto") from error

    def _commit(self, tag: str, step: int, manifest: dict) -> None:
        meta = {"step": step, "tag": tag, "fingerprint": self.fingerprint,
                "world_size": self.world_size, integrity.MANIFEST_KEY: manifest}
        atomic_write(self.dir / tag / META_FILE, json.dumps(meta, indent=1))
        atomic_write(self.dir / LATEST_FILE, tag)
        self._prune(keep_tag=tag)

    def _prune(self, keep_tag: str) -> None:
        """Keep the newest keep_last complete tags; delete older and incomplete ones."""
        tags = sorted((step, p.name) for p in self.dir.iterdir()
                      if (step := step_of(p.name)) is not None and p.is_dir())
        complete = [name for _, name in tags if (self.dir / name / META_FILE).is_file()]
        keep = set(complete[-self.keep_last:]) | {keep_tag}
        for _, name in tags:
            if name not in keep:
                shutil.rmtree(self.dir / name, ignore_errors=True)

    def verified(self, ref: CheckpointRef, fallback: bool) -> CheckpointRef:
        """Collective: `ref` if every file matches its sha256, else (see `choose`) the newest older
        checkpoint that does, or a ValueError naming the damaged file."""
        chosen = choose(ref.load_dir, ref.tag, self.problems, fallback)
        return replace(chosen, skipped=ref.skipped + chosen.skipped)

    def problems(self, ref: CheckpointRef) -> list[str]:
        """Collective: what is wrong with `ref`'s files (sizes, sha256), empty when intact."""
        return integrity.verify(ref.path, ref.meta.get(integrity.MANIFEST_KEY), self.rank,
                                self.world_size)

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


def _attempt(write: Callable, *args, **kwargs) -> BaseException | None:
    """Run a write; return its error instead of raising (the caller agrees with the other ranks)."""
    try:
        write(*args, **kwargs)
    except Exception as error:  # disk full, quota, I/O: any failure of the write is reported
        return error
    return None


def _describe(error: BaseException | None) -> str:
    """The error, plus the OS error underneath it (torch.save hides errno behind its own text)."""
    if error is None:
        return "another rank failed to write its part"
    cause = error
    while cause is not None and not isinstance(cause, OSError):
        cause = cause.__cause__ or cause.__context__
    text = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    return text if cause is None or cause is error else f"{text} ({cause.strerror})"


def _space(directory: Path) -> str:
    free = shutil.disk_usage(directory).free if directory.exists() else 0
    text = f"{free / 2**20:.1f} MiB free on that file system"
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY:
        text += f"; this process may not write files above {limit} bytes (ulimit -f)"
    return text
