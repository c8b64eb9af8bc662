"""What a run does after non-finite steps: trainer.on_divergence, trainer.max_bad_steps.

Every bad step (a non-finite loss or gradient) is skipped, whatever the setting: step_guard.py
keeps it out of the weights, the optimizer moments and the FP8 scales, and the console gets a
warning naming the step and what went non-finite. The setting picks what follows:

    stop      the first bad step stops the run
    skip      (default) bad steps are skipped; max_bad_steps in a row stop the run, as DeepSpeed's
              loss scaler skips an overflow but a model that produces NaN on every batch is lost
    rollback  max_bad_steps in a row roll the run back, by hand-tuned large-run practice: reload
              the newest good checkpoint not rolled back to before (sha256-verified), keep the data
              position, so the batches from that checkpoint through the bad window are skipped,
              save (so a crash cannot replay the bad window) and continue; at most
              max_rollbacks per launch, then the run stops

Stopping raises DivergenceError (exit code 3) with the bad steps, the report of the last one
and the newest checkpoint, which holds finite weights: no checkpoint is written while bad steps
are in a row, and the trainer refuses to write one with non-finite weights at any time.

Step numbers keep counting through skipped steps and rollbacks: step s always means "after
the data of s global batches", and the LR schedule follows it (step_guard.sync_lr_schedule).
A rollback is an event record in metrics.jsonl ({"event": "rollback", "checkpoint": ...,
"skipped_data_steps": [first, last]}); the records of the rolled-back steps move to
metrics.discarded.jsonl, so metrics.jsonl holds the live trajectory only.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path

from fp8train.train.checkpoint import (CheckpointRef, Checkpointer, complete_tags, latest_tag,
                                       read_checkpoint)
from fp8train.train.errors import TrainingError
from fp8train.train.schema import OnDivergence
from fp8train.train.step_guard import StepReport


class DivergenceError(TrainingError):
    """The run kept producing non-finite steps; nothing non-finite was saved."""


class Verdict(Enum):
    CONTINUE = "continue"
    STOP = "stop"
    ROLLBACK = "rollback"


class DivergencePolicy:
    """Counts bad steps in a row and decides (see the module docstring)."""

    def __init__(self, mode: OnDivergence, max_bad_steps: int, max_rollbacks: int):
        self.mode, self.max_bad_steps, self.max_rollbacks = mode, max_bad_steps, max_rollbacks
        self.streak: list[int] = []  # steps of the current run of bad steps
        self.skipped = 0
        self.rollbacks = 0
        self.tried: set[str] = set()  # tags rolled back to in this launch

    @property
    def healthy(self) -> bool:
        """False while bad steps are in a row: no periodic checkpoint is written then."""
        return not self.streak

    def judge(self, report: StepReport | None) -> Verdict:
        if report is None:
            self.streak = []
            return Verdict.CONTINUE
        if report.loss_scale_overflow:
            return Verdict.CONTINUE  # fp16's loss scaler at work, not divergence
        self.skipped += 1
        self.streak.append(report.step)
        if self.mode == OnDivergence.stop:
            return Verdict.STOP
        if len(self.streak) < self.max_bad_steps:
            return Verdict.CONTINUE
        if self.mode == OnDivergence.rollback and self.rollbacks < self.max_rollbacks:
            return Verdict.ROLLBACK
        return Verdict.STOP

    def rollback_target(self, checkpointer: Checkpointer) -> CheckpointRef | None:
        """Collective: the newest complete checkpoint not rolled back to before whose files
        verify, or None. Records it as tried."""
        for tag in reversed(complete_tags(checkpointer.dir)):
            if tag in self.tried:
                continue
            try:
                ref = read_checkpoint(checkpointer.dir, tag)
            except ValueError:
                continue
            if not checkpointer.problems(ref):
                self.tried.add(tag)
                return ref
        return None

    def rolled_back(self, ref: CheckpointRef, step: int) -> dict:
        """Count a rollback to `ref` at `step`; returns its metrics.jsonl event record."""
        first, last = self.streak[0], self.streak[-1]
        self.rollbacks += 1
        self.streak = []
        return {"event": "rollback", "step": step, "checkpoint_step": ref.step,
                "checkpoint": ref.tag, "skipped_data_steps": [ref.step + 1, step],
                "reason": f"non-finite steps {first}..{last}: rolled back to {ref.path}, skipping "
                          f"the data of steps {ref.step + 1}..{step}"}

    def describe(self, report: StepReport) -> str:
        return (f"{report.describe()} (bad steps in a row: {len(self.streak)} of "
                f"trainer.max_bad_steps={self.max_bad_steps})")

    def stop_message(self, report: StepReport, checkpoints_dir: Path) -> str:
        latest = latest_tag(checkpoints_dir)
        newest = checkpoints_dir / latest if latest else None
        steps = ", ".join(map(str, self.streak[-10:]))
        why = {OnDivergence.stop: "trainer.on_divergence=stop stops at the first one",
               OnDivergence.skip: f"trainer.max_bad_steps={self.max_bad_steps} in a row stop the run",
               OnDivergence.rollback: f"{self.rollbacks} rollback(s) did not help "
                                      f"(trainer.max_rollbacks={self.max_rollbacks}) or no good "
                                      f"checkpoint was left to roll back to"}[self.mode]
        saved = (f"the newest checkpoint, {newest}, holds finite weights" if newest
                 else "no checkpoint had been written")
        hint = "" if self.mode == OnDivergence.rollback else ", or set trainer.on_divergence=rollback"
        return (f"training diverged: {len(self.streak)} non-finite step(s) in a row ({steps}); "
                f"{why}. Last: {report.describe()}. Nothing non-finite was saved: {saved}. "
                f"Lower optim.lr or check the data{hint}")
