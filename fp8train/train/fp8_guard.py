"""The trainer's side of the FP8 health guard (the policy is fp8train/numerics/health_guard.py).

    guard = FP8GuardHook(cfg.trainer.fp8_guard, spec.recipe, logger, device)
    guard.restore(model, spec.resume_from)      # before the engine loads weights: replay promotions
    guard.restore(model, rollback_ref)          # a rollback inside the run: the same, and promotions
                                                # made after that checkpoint are undone first
    metrics.update(guard.check(step, model, telemetry))   # on every FP8 telemetry step
    guard.save(tag_dir, is_main)                # before the checkpoint is committed
    summary["fp8_guard"] = guard.summary()

Every rank must make the same decision (a promotion changes the module structure, and the next
amax all-reduce would hang otherwise), so the telemetry is reduced over ranks first: the worst
value wins (MAX of saturated, underflow, amax; MIN of sqnr_db).

The guard's state is written as fp8_guard.json into the checkpoint's tag folder BEFORE the
checkpoint is committed (fp8train_meta.json and `latest` come last), so a committed checkpoint
always has the guard state of its step. A resumed run reads it and replays the promotions before
the weights are loaded, whatever its own mode (the module structure must match the checkpoint).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from fp8train.numerics.health_guard import GuardThresholds, HealthGuard, promote_layer, rewind_promotions
from fp8train.train import distributed
from fp8train.train.schema import FP8GuardConfig, GuardMode

GUARD_FILE = "fp8_guard.json"
_MIN_STATS = ("sqnr_db",)


def reduce_over_ranks(telemetry: dict[str, float], device) -> dict[str, float]:
    """The worst value of every FP8 telemetry entry over all ranks (keys are the same everywhere)."""
    keys = sorted(k for k, v in telemetry.items() if k.startswith("fp8/") and v is not None)
    low = [k for k in keys if k.rsplit("/", 1)[-1] in _MIN_STATS]
    high = [k for k in keys if k not in low]
    out = dict(zip(high, distributed.all_reduce([float(telemetry[k]) for k in high], "max", device)))
    if low:
        out.update(zip(low, distributed.all_reduce([float(telemetry[k]) for k in low], "min", device)))
    return out


class FP8GuardHook:
    def __init__(self, config: FP8GuardConfig, recipe, logger, device):
        self.mode, self.recipe, self.logger, self.device = GuardMode(config.mode), recipe, logger, device
        self.guard = HealthGuard(GuardThresholds(config.max_saturated, config.max_underflow, config.min_sqnr_db,
                                                 config.max_amax_jump, config.patience))
        self.warnings: list[dict] = []

    def restore(self, model, checkpoint_ref) -> None:
        """Give `model` the structure and the guard the state of a checkpoint, before its weights
        load: a resume (nothing promoted yet) or a rollback (later promotions are undone)."""
        if checkpoint_ref is None:
            return
        path = Path(checkpoint_ref.path) / GUARD_FILE
        state = json.loads(path.read_text()) if path.is_file() else {}
        rewind_promotions(model, self.recipe, self.guard.promotions, state.get("promotions", []))
        self.guard.load_state_dict(state)
        for record in self.guard.promotions:
            self.logger.info(f"fp8 guard: restored promotion of {record['layer']} -> {record['promotion']} "
                             f"(step {record['step']})")

    def check(self, step: int, model, telemetry: dict[str, float]) -> dict[str, float]:
        """One check on this step's telemetry; returns metrics for the log."""
        if self.mode is GuardMode.off or not any(k.startswith("fp8/") for k in telemetry):
            return {}
        decisions = self.guard.observe(step, reduce_over_ranks(telemetry, self.device), model)
        for decision in decisions:
            if self.mode is GuardMode.act:
                promote_layer(model, decision.layer, decision.promotion)
                self.guard.record(decision)
                self.logger.warning(f"fp8 guard: promoted {decision}")
            else:
                self.warnings.append(decision.to_dict())
                self.logger.warning(f"fp8 guard (warn only, trainer.fp8_guard.mode=act promotes): {decision}")
        return {"fp8_guard/promoted_layers": len(self.guard.promotions), "fp8_guard/events": len(decisions)}

    def save(self, tag_dir: Path, is_main: bool) -> None:
        if not is_main or (self.mode is GuardMode.off and not self.guard.promotions):
            return
        tag_dir.mkdir(parents=True, exist_ok=True)
        tmp = tag_dir / f".{GUARD_FILE}.tmp"
        tmp.write_text(json.dumps(self.guard.state_dict(), indent=1))
        os.replace(tmp, tag_dir / GUARD_FILE)

    def summary(self) -> dict:
        return {"mode": self.mode.value, "promotions": list(self.guard.promotions), "warnings": list(self.warnings)}
