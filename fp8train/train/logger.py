"""One logger object for everything only rank 0 should do: console, metrics file, wandb, progress.

    logger = make_logger(dist.is_main, ...)   # RunLogger on rank 0, NullLogger elsewhere
    logger.info("...")                        # console + <run_dir>/train.rank0.log (via Hydra)
    logger.log_metrics(step, {...})           # <run_dir>/metrics.jsonl (always) + wandb
    logger.progress(step, loss=..., ...)      # tqdm bar: loss, tokens/s, lr

The trainer calls these on every rank without asking which rank it is; the null variant makes
the call free on the others. That keeps `if rank == 0` out of the training code.

metrics.jsonl holds one JSON object per logged step (`step`, `tokens`, `train/...`, `val/...`,
`fp8/...`, `moe/...`). It is appended to, so a resumed run continues the same file; records
beyond the resumed step (written after the checkpoint by a run that was then killed) are moved
to metrics.discarded.jsonl rather than deleted. It holds one trajectory: a branch (a resume
from an older checkpoint, branching.py) or a rollback (divergence.py) moves the records past
the checkpoint it returns to the same way, and `logger.event(...)` adds a record with an
"event" key saying what happened; metric readers skip event records.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Any

from fp8train.train.schema import LoggerConfig, WandbMode

METRICS_FILE = "metrics.jsonl"
DISCARDED_FILE = "metrics.discarded.jsonl"
SUMMARY_FILE = "summary.json"
PREEMPTED_FILE = "PREEMPTED"
_log = logging.getLogger("fp8train")


def _json_value(value: Any) -> Any:
    value = value.item() if hasattr(value, "item") else value
    if isinstance(value, float) and not math.isfinite(value):
        return None  # strict JSON has no NaN/inf
    return value


def _past(line: str, last_step: int) -> bool:
    """A record after last_step, or a torn line (a write cut short by a kill or a full disk)."""
    try:
        return json.loads(line).get("step", 0) > last_step
    except (json.JSONDecodeError, AttributeError):
        return True


def trim_metrics(path: Path, last_step: int) -> int:
    """Move records with step > last_step (and torn lines) to metrics.discarded.jsonl; return
    how many moved."""
    if not path.is_file():
        return 0
    keep, drop = [], []
    for line in path.read_text(errors="replace").splitlines():
        if line.strip():
            (drop if _past(line, last_step) else keep).append(line)
    if drop:
        with open(path.with_name(DISCARDED_FILE), "a") as discarded:
            discarded.write("\n".join(drop) + "\n")
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(f"{line}\n" for line in keep))
        os.replace(tmp, path)
    return len(drop)


def wandb_run_id(run_dir: Path) -> str:
    """A stable wandb id for this run folder (wandb allows [A-Za-z0-9_-], at most 64 chars)."""
    name = re.sub(r"[^A-Za-z0-9_-]+", "-", f"{run_dir.parent.name}-{run_dir.name}")
    if len(name) <= 64:
        return name
    return f"{name[:55]}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"


class NullLogger:
    """The non-zero ranks' logger: every call does nothing."""

    def info(self, message: str) -> None: ...
    def warning(self, message: str) -> None: ...
    def start(self, max_steps: int, start_step: int) -> None: ...
    def log_metrics(self, step: int, metrics: dict[str, Any]) -> None: ...
    def progress(self, step: int, **shown: float) -> None: ...
    def summary(self, summary: dict[str, Any]) -> None: ...
    def mark_preempted(self, step: int, signum: int | None) -> None: ...
    def event(self, record: dict[str, Any]) -> None: ...
    def close(self) -> None: ...


class RunLogger(NullLogger):
    """Rank 0's logger: Python logging, metrics.jsonl, wandb and a tqdm progress bar."""

    def __init__(self, run_dir: Path, config: LoggerConfig, resolved_config: dict):
        self.run_dir = run_dir
        self.config = config
        self.metrics_path = run_dir / METRICS_FILE
        self.resolved_config = resolved_config
        self._metrics_file = None
        self._wandb_run = None
        self._bar = None

    def info(self, message: str) -> None:
        self._write(logging.INFO, message)

    def warning(self, message: str) -> None:
        self._write(logging.WARNING, message)

    def _write(self, level: int, message: str) -> None:
        if self._bar is not None:
            self._bar.clear()
        _log.log(level, message)
        if self._bar is not None:
            self._bar.refresh()

    def start(self, max_steps: int, start_step: int) -> None:
        """Open the metrics file, the wandb run and the progress bar at `start_step`."""
        marker = self.run_dir / PREEMPTED_FILE
        if marker.exists():  # left by the attempt we are resuming; this attempt starts afresh
            marker.unlink()
            self.info(f"removed {marker} left by the previous attempt")
        moved = trim_metrics(self.metrics_path, start_step)
        if moved:
            self.info(f"moved {moved} metrics records past step {start_step} to {DISCARDED_FILE}")
        self._metrics_file = open(self.metrics_path, "a", buffering=1)
        self._wandb_run = self._init_wandb()
        if self.config.progress_bar:
            from tqdm import tqdm

            self._bar = tqdm(total=max_steps, initial=start_step, unit="step",
                             dynamic_ncols=True, mininterval=1.0)

    def _init_wandb(self):
        if self.config.mode == WandbMode.disabled:
            return None
        try:
            import wandb
        except ModuleNotFoundError as error:
            raise RuntimeError(f"logger.mode={self.config.mode.value} needs wandb, which is not installed: "
                               "`pip install wandb`, or run with logger.mode=disabled (metrics.jsonl is "
                               "written either way)") from error

        run = wandb.init(project=self.config.project, entity=self.config.entity,
                         name=self.config.name or self.run_dir.name, id=wandb_run_id(self.run_dir),
                         resume="allow", mode=self.config.mode.value, dir=str(self.run_dir),
                         config=self.resolved_config, tags=list(self.config.tags),
                         settings=wandb.Settings(console="off", silent=True))
        self.info(f"wandb {self.config.mode.value} run {run.id} in {self.run_dir / 'wandb'}")
        return run

    def log_metrics(self, step: int, metrics: dict[str, Any]) -> None:
        record = {"step": step, **{key: _json_value(value) for key, value in metrics.items()}}
        self._metrics_file.write(json.dumps(record) + "\n")
        if self._wandb_run is not None:
            self._wandb_run.log(record, step=step)

    def event(self, record: dict[str, Any]) -> None:
        """Write an event record (branch, rollback); first move the records past the checkpoint
        it returns to (`checkpoint_step`) to metrics.discarded.jsonl."""
        self._metrics_file.close()
        moved = trim_metrics(self.metrics_path, record["checkpoint_step"])
        self._metrics_file = open(self.metrics_path, "a", buffering=1)
        self._metrics_file.write(json.dumps({**record, "discarded_records": moved}) + "\n")
        self.warning(f"{record['event']} at step {record['step']}: {record.get('reason', '')}"
                     + (f"; moved {moved} metrics records to {DISCARDED_FILE}" if moved else ""))

    def progress(self, step: int, **shown: float) -> None:
        if self._bar is None:
            return
        self._bar.set_postfix({key: f"{value:.4g}" for key, value in shown.items()}, refresh=False)
        self._bar.update(step - self._bar.n)

    def summary(self, summary: dict[str, Any]) -> None:
        """Print the summary, write <run_dir>/summary.json and the wandb run summary."""
        path = self.run_dir / SUMMARY_FILE
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps({k: _json_value(v) for k, v in summary.items()}, indent=1))
        os.replace(tmp, path)
        lines = "\n".join(f"  {key:<20} {value}" for key, value in summary.items())
        self.info(f"summary ({path}):\n{lines}")
        if self._wandb_run is not None:
            self._wandb_run.summary.update({k: _json_value(v) for k, v in summary.items()})

    def mark_preempted(self, step: int, signum: int | None) -> None:
        """<run_dir>/PREEMPTED tells the Slurm script to requeue the job."""
        (self.run_dir / PREEMPTED_FILE).write_text(f"step {step} signal {signum}\n")
        self.warning(f"stopped by signal {signum} at step {step}; checkpoint saved, "
                     f"wrote {self.run_dir / PREEMPTED_FILE}")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._metrics_file is not None:
            self._metrics_file.close()
            self._metrics_file = None
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None


def make_logger(is_main: bool, run_dir: Path, config: LoggerConfig, resolved_config: dict):
    """RunLogger on the main rank, NullLogger on every other rank."""
    return RunLogger(run_dir, config, resolved_config) if is_main else NullLogger()
