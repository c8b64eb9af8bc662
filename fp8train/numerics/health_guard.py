"""FP8 health guard: watch each layer's FP8 telemetry and promote a layer that is in trouble.

The trainer samples FP8 telemetry every N steps (telemetry.py): per layer and operand role the
amax, the fraction of elements SATURATED (clipped to +-max), the fraction of nonzeros that
UNDERFLOWED to zero, and the cast's SQNR in dB. The guard compares them with thresholds:

    saturated  > max_saturated     the scale is too large for this tensor (delayed scale outgrown)
    underflow  > max_underflow     the format's dynamic range is too narrow for one scale
    sqnr_db    < min_sqnr_db       the cast loses too much signal whatever the cause
    amax / previous amax > max_amax_jump   (delayed roles only) an outlier the history has not seen

A layer with a violation in `patience` consecutive checks is PROMOTED one rung up a ladder that
keeps every role's FP8 format (so the recipe's format assignment survives):

    delayed scaling  ->  current scaling        (the scale follows the tensor; no outgrown scale)
    tensorwise/row   ->  blockwise              (1x128 tiles, 128x128 weight blocks: one scale per
                                                 group fixes a narrow dynamic range; only when both
                                                 dimensions are multiples of 128)
    any FP8          ->  high precision          (nn.Linear in the working precision, BF16)

The swap keeps the layer's Parameter objects (FP8Linear.from_linear / a plain nn.Linear sharing
them), so the optimizer and DeepSpeed (ZeRO 0-2) keep working. The guard's state (promotions made,
consecutive strikes, the last amaxes) is plain JSON data: `state_dict()` goes into the checkpoint,
and a resumed run replays the promotions (`replay_promotions`) BEFORE loading weights, so the
loaded FP8 buffers meet the module structure they were saved from.

This module decides and swaps; the trainer hook (fp8train/train/fp8_guard.py) reduces telemetry
over ranks (every rank must take the same decision), logs, applies and checkpoints.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import Enum

from torch import nn

from fp8train.numerics.linear import FP8Linear
from fp8train.numerics.recipe import ROLES, Recipe
from fp8train.quant.schemes import BLOCK, GemmClass, RecipeScaling, scheme_for


class Promotion(Enum):
    CURRENT = "current"             # delayed -> current scaling, same formats
    BLOCKWISE = "blockwise"         # tensorwise/rowwise -> 1x128 / 128x128 blocks, same formats
    HIGH_PRECISION = "bf16"         # FP8 off for this layer


@dataclass(frozen=True)
class GuardThresholds:
    max_saturated: float = 1e-3
    max_underflow: float = 0.1
    min_sqnr_db: float = 10.0
    max_amax_jump: float = 16.0
    patience: int = 2

    def __post_init__(self):
        for name in ("max_saturated", "max_underflow"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"fp8_guard.{name}={getattr(self, name)} must be a fraction in [0, 1]")
        if self.max_amax_jump <= 1.0:
            raise ValueError(f"fp8_guard.max_amax_jump={self.max_amax_jump} must be > 1 (a ratio of amaxes)")
        if not isinstance(self.patience, int) or self.patience < 1:
            raise ValueError(f"fp8_guard.patience={self.patience} must be an integer >= 1 (checks in a row)")


@dataclass(frozen=True)
class Violation:
    role: str
    metric: str
    value: float
    limit: float

    def __str__(self) -> str:
        op = "<" if self.metric == "sqnr_db" else ">"
        return f"{self.role} {self.metric} {self.value:.4g} {op} {self.limit:.4g}"


@dataclass(frozen=True)
class GuardDecision:
    step: int
    layer: str
    promotion: Promotion
    reasons: tuple[str, ...]

    def __str__(self) -> str:
        return f"step {self.step}: {self.layer} -> {self.promotion.value} ({'; '.join(self.reasons)})"

    def to_dict(self) -> dict:
        return {"step": self.step, "layer": self.layer, "promotion": self.promotion.value,
                "reasons": list(self.reasons)}


def parse_telemetry(telemetry: dict[str, float]) -> dict[str, dict[str, dict[str, float]]]:
    """`fp8/<layer>/<role>/<stat>` -> {layer: {role: {stat: value}}} (other keys are ignored)."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for key, value in telemetry.items():
        parts = key.split("/")
        if len(parts) == 4 and parts[0] == "fp8" and parts[2] in ROLES and value is not None:
            out.setdefault(parts[1], {}).setdefault(parts[2], {})[parts[3]] = float(value)
    return out


# ----------------------------------------------------------------------------- the ladder
def next_promotion(layer: nn.Module) -> Promotion | None:
    """The next rung for an FP8 layer, or None (already high precision, or not an FP8Linear)."""
    if not isinstance(layer, FP8Linear):
        return None
    scalings = {layer.recipe.role(role).recipe_scaling for role in ROLES}
    if RecipeScaling.DELAYED in scalings:
        return Promotion.CURRENT
    blockable = layer.in_features % BLOCK == 0 and layer.out_features % BLOCK == 0
    if scalings != {RecipeScaling.BLOCKWISE} and blockable:
        return Promotion.BLOCKWISE
    return Promotion.HIGH_PRECISION


def promoted_recipe(recipe: Recipe, promotion: Promotion) -> Recipe:
    """The recipe one rung up, every role keeping its format (and power-of-2 choice)."""
    if promotion is Promotion.HIGH_PRECISION:
        raise ValueError("high precision is not an FP8 recipe; promote_layer swaps in an nn.Linear")

    def role(name: str):
        config = recipe.role(name)
        scaling = config.recipe_scaling
        if promotion is Promotion.BLOCKWISE:
            scaling = RecipeScaling.BLOCKWISE
        elif scaling is RecipeScaling.DELAYED:
            scaling = RecipeScaling.CURRENT
        tensorwise = scheme_for(scaling, name).gemm_class is GemmClass.TENSORWISE  # percentile clipping's domain
        return dataclasses.replace(config, scaling=scaling.value,
                                   amax_percentile=config.amax_percentile if tensorwise else None)

    padding = "zero" if promotion is Promotion.BLOCKWISE else recipe.padding
    return dataclasses.replace(recipe, name=f"{recipe.name}+{promotion.value}", padding=padding,
                               **{name: role(name) for name in ROLES}).validate()


class HighPrecisionLinear(nn.Linear):
    """The top rung: an nn.Linear in the working precision, with the FP8 layers' `weight_transform`
    slot (QAT's weight fake quantizer survives the promotion). Its name marks it as promoted."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.weight_transform: nn.Module | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "HighPrecisionLinear":
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        layer.weight, layer.bias = linear.weight, linear.bias
        return layer

    def forward(self, x):
        weight = self.weight if self.weight_transform is None else self.weight_transform(self.weight)
        return nn.functional.linear(x, weight, self.bias)


def promote_layer(model: nn.Module, fqn: str, promotion: Promotion) -> nn.Module:
    """Swap the FP8 layer at `fqn` for its promoted form (same Parameters); returns the new layer."""
    layer = model.get_submodule(fqn)
    if not isinstance(layer, FP8Linear):
        raise ValueError(f"{fqn} is a {type(layer).__name__}, not an FP8Linear: nothing to promote")
    if promotion is Promotion.HIGH_PRECISION:
        new = HighPrecisionLinear.from_linear(layer)
    else:
        new = FP8Linear.from_linear(layer, promoted_recipe(layer.recipe, promotion))
    return _swap(model, fqn, layer, new)


def _swap(model: nn.Module, fqn: str, layer: nn.Module, new: nn.Module) -> nn.Module:
    """Put `new` where `layer` was; QAT's fake quantizers, pre-hooks and the mode move along."""
    for slot in ("weight_transform", "input_fake_quant"):
        if getattr(layer, slot, None) is not None:
            setattr(new, slot, getattr(layer, slot))
    for hook in layer._forward_pre_hooks.values():
        new.register_forward_pre_hook(hook)
    new.train(layer.training)
    parent, _, leaf = fqn.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)
    return new


def replay_promotions(model: nn.Module, promotions: list[dict]) -> None:
    """Re-apply saved promotions in their order (a resumed run, before it loads weights)."""
    for record in promotions:
        promote_layer(model, record["layer"], Promotion(record["promotion"]))


def rewind_promotions(model: nn.Module, recipe: Recipe, current: list[dict], target: list[dict]) -> None:
    """Bring the module structure from the `current` promotions back to `target`'s (a rollback to
    an earlier checkpoint): every layer whose promotions differ is rebuilt with the run's `recipe`
    (same Parameters), then promoted again as `target` says."""
    def of(records: list[dict], fqn: str) -> list[str]:
        return [r["promotion"] for r in records if r["layer"] == fqn]

    for fqn in sorted({r["layer"] for r in current + target}):
        if of(current, fqn) != of(target, fqn):
            layer = model.get_submodule(fqn)
            _swap(model, fqn, layer, FP8Linear.from_linear(layer, recipe))
            replay_promotions(model, [r for r in target if r["layer"] == fqn])


# ----------------------------------------------------------------------------- the policy
@dataclass
class HealthGuard:
    """Thresholds plus the state that must survive a restart (all JSON data, see state_dict)."""

    thresholds: GuardThresholds = field(default_factory=GuardThresholds)
    strikes: dict[str, int] = field(default_factory=dict)          # layer -> checks in a row with a violation
    last_amax: dict[str, float] = field(default_factory=dict)      # "layer/role" -> amax at the last check
    promotions: list[dict] = field(default_factory=list)           # applied GuardDecisions, in order

    def violations(self, layer: str, roles: dict[str, dict[str, float]], module: nn.Module | None
                   ) -> list[Violation]:
        t, found = self.thresholds, []
        for role, stats in sorted(roles.items()):
            for metric, limit in (("saturated", t.max_saturated), ("underflow", t.max_underflow)):
                if stats.get(metric, 0.0) > limit:
                    found.append(Violation(role, metric, stats[metric], limit))
            if "sqnr_db" in stats and stats["sqnr_db"] < t.min_sqnr_db:
                found.append(Violation(role, "sqnr_db", stats["sqnr_db"], t.min_sqnr_db))
            amax, previous = stats.get("amax"), self.last_amax.get(f"{layer}/{role}")
            delayed = isinstance(module, FP8Linear) and module.recipe.role(role).recipe_scaling is RecipeScaling.DELAYED
            if delayed and amax is not None and previous and amax / previous > t.max_amax_jump:
                found.append(Violation(role, "amax_jump", amax / previous, t.max_amax_jump))
            if amax is not None:
                self.last_amax[f"{layer}/{role}"] = amax
        return found

    def observe(self, step: int, telemetry: dict[str, float], model: nn.Module) -> list[GuardDecision]:
        """One check: update strikes; return a decision for every layer at `patience` strikes that
        has a rung left (its strikes restart from zero: a warn-only run warns every `patience`
        checks, not every check). Apply with `promote_layer`, then `record` the decision."""
        decisions = []
        for layer, roles in sorted(parse_telemetry(telemetry).items()):
            module = _find(model, layer)
            found = self.violations(layer, roles, module)
            self.strikes[layer] = self.strikes.get(layer, 0) + 1 if found else 0
            promotion = next_promotion(module) if module is not None else None
            if found and self.strikes[layer] >= self.thresholds.patience and promotion is not None:
                self.strikes[layer] = 0
                reasons = tuple(str(v) for v in found) + (f"{self.thresholds.patience} check(s) in a row",)
                decisions.append(GuardDecision(step, layer, promotion, reasons))
        return decisions

    def record(self, decision: GuardDecision) -> None:
        self.promotions.append(decision.to_dict())
        for key in [k for k in self.last_amax if k.startswith(f"{decision.layer}/")]:
            del self.last_amax[key]  # a new scaling: the old amaxes say nothing about it

    def state_dict(self) -> dict:
        return {"strikes": dict(self.strikes), "last_amax": dict(self.last_amax),
                "promotions": [dict(p) for p in self.promotions]}

    def load_state_dict(self, state: dict) -> None:
        self.strikes = {k: int(v) for k, v in state.get("strikes", {}).items()}
        self.last_amax = {k: float(v) for k, v in state.get("last_amax", {}).items()}
        self.promotions = [dict(p) for p in state.get("promotions", [])]


def _find(model: nn.Module, fqn: str) -> nn.Module | None:
    try:
        return model.get_submodule(fqn)
    except AttributeError:
        return None
