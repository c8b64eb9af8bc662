"""Cheap kill -9 trials of checkpoint writing: dozens per second-scale budget, no DeepSpeed.

One trial = a run folder and a few rounds. In each round a forked child resumes the folder the way
the trainer does (find_checkpoint auto -> Checkpointer.verified -> load -> start_branch), then
saves checkpoints in a loop through the real Checkpointer (manifest, commit, prune) and now and
then branches back to an older one, until the parent SIGKILLs it at a random (seeded) moment.
A `FakeEngine` stands in for DeepSpeed: it writes a model file and an optimizer file per tag whose
contents are a function of (step, branch), so a load can be checked byte for byte.

The child journals each operation before and after it ("saving 7", "committed 7", "branching 4",
"branched 4"): appended with os.write, so a kill never loses a finished line. After each kill the
parent replays the journal into what must exist and checks:

    resumable   find_checkpoint(auto) + sha256 verification succeed without skipping anything:
                a kill never damages a committed checkpoint
    latest      `latest` names a complete tag, the newest committed one (or the one whose commit
                or branch was cut short)
    content     the loaded files are those written for that (step, branch)
    nothing     every checkpoint that pruning keeps is present and intact; every checkpoint of
    lost        an abandoned branch is in checkpoints/abandoned/ (or, if the kill cut the move
                short, still beside `latest`, to be moved by the next resume)
"""

from __future__ import annotations

import os
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from fp8train.train import branching, checkpoint
from fp8train.train.checkpoint import Checkpointer, find_checkpoint, read_checkpoint

KEEP_LAST = 2
JOURNAL = "journal.txt"
MODEL_FILE, OPTIM_FILE = "mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"


def payload(step: int, branch: int, numel: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(step * 1009 + branch)
    return torch.randn(numel, generator=generator)


class FakeEngine:
    """save_checkpoint / load_checkpoint with DeepSpeed's signatures and file layout."""

    def __init__(self, numel: int):
        self.numel, self.branch = numel, 0

    def save_checkpoint(self, save_dir, tag, client_state, save_latest=False):
        folder = Path(save_dir) / tag
        folder.mkdir(parents=True, exist_ok=True)
        step = client_state["step"]
        torch.save({"module": payload(step, self.branch, self.numel),
                    "client_state": {**client_state, "branch": self.branch}}, folder / MODEL_FILE)
        torch.save({"optim": payload(step, self.branch, self.numel) * 2}, folder / OPTIM_FILE)

    def load_checkpoint(self, load_dir, tag, **_):
        model = torch.load(Path(load_dir) / tag / MODEL_FILE, weights_only=False)
        optim = torch.load(Path(load_dir) / tag / OPTIM_FILE, weights_only=False)
        state = model["client_state"]
        expected = payload(state["step"], state["branch"], self.numel)
        if not (torch.equal(model["module"], expected) and torch.equal(optim["optim"], expected * 2)):
            raise AssertionError(f"{load_dir}/{tag}: content differs from what was written")
        self.branch = state["branch"]
        return str(Path(load_dir) / tag), state


def _journal(fd: int, *words) -> None:
    os.write(fd, (" ".join(map(str, words)) + "\n").encode())


def resume(run_dir: Path, engine: FakeEngine, saver: Checkpointer) -> int:
    """The trainer's resume path; returns the step resumed at (0 for a fresh folder)."""
    ref = find_checkpoint("auto", run_dir)
    if ref is None:
        return 0
    ref = saver.verified(ref, fallback=True)
    if ref.skipped:
        raise AssertionError(f"a kill damaged a committed checkpoint: {ref.skipped}")
    saver.load(engine, ref)
    branching.start_branch(saver.dir, ref, "fault-injection resume")
    return ref.step


def writer(run_dir: Path, seed: int, numel: int) -> None:
    """The child: resume, then save and branch until killed."""
    rng = random.Random(seed)
    engine, saver = FakeEngine(numel), Checkpointer(run_dir, KEEP_LAST, {"model": {}, "recipe": "x"}, 0, 1)
    fd = os.open(run_dir / JOURNAL, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    step = resume(run_dir, engine, saver)
    _journal(fd, "resumed", step, engine.branch)
    while True:
        tags = checkpoint.complete_tags(saver.dir)
        if len(tags) >= 2 and rng.random() < 0.2:
            ref = read_checkpoint(saver.dir, rng.choice(tags[:-1]))
            _journal(fd, "branching", ref.step)
            saver.load(engine, ref)
            engine.branch = rng.randrange(1, 1 << 30)
            branching.start_branch(saver.dir, ref, "fault-injection branch")
            step = ref.step
            _journal(fd, "branched", step, engine.branch)
        else:
            step += rng.choice((1, 1, 2))
            _journal(fd, "saving", step, engine.branch)
            saver.save(engine, step, {"data": {"step": step}})
            _journal(fd, "committed", step, engine.branch)


@dataclass
class Expected:
    """What the journal says must be on disk."""

    present: dict[int, int]  # step -> branch of the live branch's kept checkpoints
    abandoned: dict[int, int]  # step -> branch, set aside by branches
    pending: tuple | None  # the operation the kill cut short: ("saving", step) or ("branching", step)


def replay(lines: list[str]) -> Expected:
    present: dict[int, int] = {}
    abandoned: dict[int, int] = {}
    pending = None
    for line in lines:
        op, step, *rest = line.split()
        step = int(step)
        if op in ("saving", "branching"):
            pending = (op, step)
        elif op == "committed":
            present[step] = int(rest[0])
            for old in sorted(present)[:-KEEP_LAST]:
                del present[old]
            pending = None
        elif op == "branched":
            abandoned.update({s: b for s, b in present.items() if s > step})
            present = {s: b for s, b in present.items() if s <= step}
            pending = None
        elif op == "resumed":
            # a resume moves anything newer than its checkpoint (a branch cut short) aside;
            # resuming from a step the journal never saw committed means that commit finished
            abandoned.update({s: b for s, b in present.items() if s > step})
            present = {s: b for s, b in present.items() if s <= step}
            if step and step not in present:
                present[step] = int(rest[0])
                for old in sorted(present)[:-KEEP_LAST]:
                    del present[old]
            pending = None
    return Expected(present, abandoned, pending)


def _tag_branch(folder: Path) -> int:
    return torch.load(folder / MODEL_FILE, weights_only=False)["client_state"]["branch"]


def check(run_dir: Path, numel: int) -> str:
    """The invariants of the module docstring; returns the checkpoint resumed from."""
    expected = replay((run_dir / JOURNAL).read_text().splitlines())
    saver = Checkpointer(run_dir, KEEP_LAST, {"model": {}, "recipe": "x"}, 0, 1)
    ref = find_checkpoint("auto", run_dir)
    if ref is None:
        assert not expected.present, f"no checkpoint found, but {sorted(expected.present)} were kept"
        return "none"
    ref = saver.verified(ref, fallback=True)
    assert not ref.skipped, f"damaged: {ref.skipped}"
    newest = max(expected.present, default=0)
    allowed = {newest} | ({expected.pending[1]} if expected.pending else set())
    assert ref.step in allowed, f"resumed from {ref.tag}, expected one of {sorted(allowed)}"
    FakeEngine(numel).load_checkpoint(ref.load_dir, ref.tag)  # raises if the content differs
    may_be_gone = set()
    if expected.pending and expected.pending[0] == "saving" and len(expected.present) == KEEP_LAST:
        may_be_gone = {min(expected.present)}  # the new commit may have pruned it already
    branch_cut_short = expected.pending is not None and expected.pending[0] == "branching"
    for step, branch in expected.present.items():
        if step in may_be_gone:
            continue  # the commit cut short may have been pruning it (folder half deleted)
        assert _kept(saver.dir, step, branch, abandoned_ok=branch_cut_short and step > ref.step), \
            f"kept checkpoint step {step} (branch {branch}) is gone"
    for step, branch in expected.abandoned.items():
        assert _kept(saver.dir, step, branch, abandoned_ok=True, live_ok=True), \
            f"abandoned checkpoint step {step} (branch {branch}) was lost"
    return ref.tag


def _kept(directory: Path, step: int, branch: int, abandoned_ok: bool = False,
          live_ok: bool = True) -> bool:
    """Is (step, branch) complete in checkpoints/ (live_ok) or checkpoints/abandoned/ (abandoned_ok)?"""
    tag = checkpoint.tag_for(step)
    folders = ([directory / tag] if live_ok else []) + \
        (list((directory / branching.ABANDONED_DIR).glob(f"*/{tag}")) if abandoned_ok else [])
    return any((f / checkpoint.META_FILE).is_file() and _tag_branch(f) == branch for f in folders)


def kill_point(run_dir: Path) -> str:
    """Where the kill landed, from the journal and what is on disk."""
    lines = (run_dir / JOURNAL).read_text().splitlines() if (run_dir / JOURNAL).exists() else []
    if not lines:
        return "resume"
    op, step, *_ = lines[-1].split()
    directory = run_dir / checkpoint.CHECKPOINT_DIR
    if op == "saving":
        tag = checkpoint.tag_for(int(step))
        if not (directory / tag).is_dir():
            return "save: before its files"
        if not (directory / tag / checkpoint.META_FILE).is_file():
            return "save: writing/hashing files"
        return "save: pruning" if checkpoint.latest_tag(directory) == tag else "save: meta written, latest not yet"
    if op == "branching":
        return "branch: moving tags"
    return "between operations"


def trial(run_dir: Path, seed: int, rounds: int = 3, numel: int = 1 << 16,
          max_delay_s: float = 0.4) -> dict:
    """Fork, kill -9 at a random moment, check; `rounds` times on the same folder."""
    rng = random.Random(seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    killed_in, resumed_from = [], ""
    for round_index in range(rounds):
        pid = os.fork()
        if pid == 0:  # the child never returns into the caller (pytest or the CLI)
            try:
                torch.set_num_threads(1)
                writer(run_dir, seed * 100 + round_index, numel)
            finally:
                os._exit(1)
        time.sleep(rng.uniform(0.05, max_delay_s))
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        if os.WIFEXITED(status):
            return {"outcome": f"FAIL: the writer exited early with {os.WEXITSTATUS(status)}",
                    "killed_in": "; ".join(killed_in), "resumed_from": resumed_from}
        killed_in.append(kill_point(run_dir))
        try:
            resumed_from = check(run_dir, numel)
        except Exception as error:  # an assertion, or the resume itself failing
            return {"outcome": f"FAIL: {error}", "killed_in": "; ".join(killed_in),
                    "resumed_from": resumed_from}
    return {"outcome": "ok", "killed_in": "; ".join(killed_in), "resumed_from": resumed_from}
