"""Read the runs of a sweep back from disk: what each run was (recipe, overrides) and what it did.

A run directory, as the trainer writes it (fp8train/train/logger.py):

    <run>/metrics.jsonl          one JSON object per logged step: step, tokens, train/loss,
                                 train/tokens_per_s, and val/loss, val/ppl on eval steps
    <run>/summary.json           written at the end: recipe, final losses, tokens_per_s, preempted
    <run>/.hydra/<launch>/       Hydra's record of each launch: config.yaml, overrides.yaml
                                 (older layout: <run>/.hydra/config.yaml directly)

A sweep directory (`multirun/<id>/`) holds one run directory per job; any directory below it
with a metrics.jsonl counts as a run. This module only reads: no torch, no trainer imports.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

SKIP_DIRS = {".submitit", "wandb", "checkpoints", ".hydra"}


class CompareError(ValueError):
    """The sweep cannot be compared; the message says why and what to do."""


@dataclass
class Run:
    path: Path
    recipe: str
    overrides: list[str]
    steps: list[int] = field(default_factory=list)          # steps with a train loss
    train_loss: list[float] = field(default_factory=list)
    val_steps: list[int] = field(default_factory=list)      # steps with a validation loss
    val_loss: list[float] = field(default_factory=list)
    tokens_per_s: float | None = None
    status: str = "running"                                 # finished | preempted | diverged | running

    @property
    def group_key(self) -> tuple[str, ...]:
        """The overrides other than the recipe: runs with equal keys differ only in recipe."""
        return tuple(sorted(o for o in self.overrides if o.lstrip("+~").split("=")[0] != "recipe"))


def _latest_hydra_dir(run_dir: Path) -> Path | None:
    """The newest launch record: .hydra/<launch_id>/ (or .hydra/ itself in the flat layout)."""
    hydra = run_dir / ".hydra"
    if (hydra / "config.yaml").is_file():
        return hydra
    launches = [d for d in hydra.glob("*") if (d / "config.yaml").is_file()]
    return max(launches, key=lambda d: (d / "config.yaml").stat().st_mtime) if launches else None


def _read_yaml(path: Path):
    return yaml.safe_load(path.read_text()) if path.is_file() else None


def _read_metrics(path: Path) -> dict[int, dict]:
    """step -> record; a repeated step (a resumed run) keeps its last record.

    Event records (`"event": "branch" | "rollback"`, fp8train/train/branching.py) are not metrics;
    one with a `checkpoint_step` also drops the earlier records past that step (a trainer moves
    them to metrics.discarded.jsonl itself; this keeps files edited by hand to one trajectory)."""
    records: dict[int, dict] = {}
    lines = path.read_text().splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            if number == len(lines):
                continue  # a half-written last line of a run that is still going
            raise CompareError(f"{path}:{number} is not JSON ({error})") from error
        if "event" in record:
            back_to = record.get("checkpoint_step")
            if isinstance(back_to, int):
                records = {step: r for step, r in records.items() if step <= back_to}
        elif "step" in record:
            records[int(record["step"])] = record
    return records


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def load_run(run_dir: Path) -> Run:
    """One run directory -> Run (recipe from summary.json, else the Hydra config)."""
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").is_file() else {}
    hydra = _latest_hydra_dir(run_dir)
    config = (_read_yaml(hydra / "config.yaml") if hydra else None) or {}
    overrides = (_read_yaml(hydra / "overrides.yaml") if hydra else None) or []
    recipe = (summary.get("recipe") or (config.get("recipe") or {}).get("name")
              or (config.get("trainer") or {}).get("default_recipe") or run_dir.name)
    run = Run(path=run_dir, recipe=str(recipe), overrides=[str(o) for o in overrides])
    records = _read_metrics(run_dir / "metrics.jsonl")
    speeds = []
    for step in sorted(records):
        record = records[step]
        if _finite(record.get("train/loss")):
            run.steps.append(step)
            run.train_loss.append(float(record["train/loss"]))
        if _finite(record.get("val/loss")):
            run.val_steps.append(step)
            run.val_loss.append(float(record["val/loss"]))
        if _finite(record.get("train/tokens_per_s")):
            speeds.append(float(record["train/tokens_per_s"]))
    if _finite(summary.get("tokens_per_s")):
        run.tokens_per_s = float(summary["tokens_per_s"])
    elif speeds:  # still running: the median step, robust to the slow first steps
        run.tokens_per_s = sorted(speeds)[len(speeds) // 2]
    if summary:
        run.status = ("diverged" if summary.get("diverged") else
                      "preempted" if summary.get("preempted") else "finished")
    return run


def find_runs(sweep_dir: Path) -> list[Run]:
    """Every run below `sweep_dir` that logged at least one training step, in path order."""
    if not sweep_dir.is_dir():
        raise CompareError(f"{sweep_dir} is not a directory; pass a multirun folder, e.g. multirun/<id>")
    paths = sorted(p.parent for p in sweep_dir.rglob("metrics.jsonl")
                   if not SKIP_DIRS.intersection(p.relative_to(sweep_dir).parts[:-1]))
    runs = [run for run in map(load_run, paths) if run.steps]
    if not runs:
        raise CompareError(f"no runs under {sweep_dir}: no run directory with a non-empty metrics.jsonl "
                           "(did the sweep start? pass the multirun folder, e.g. multirun/<id>)")
    return runs
