"""The automatic per-layer precision policy: a layer whose GEMMs do not pay for FP8 stays in BF16.

FP8 gains only on large GEMMs; below the crossover the casts (and launches) cost more than the
faster GEMMs save, so converting every linear layer makes small models slower than BF16. The
policy is a `module_filter` for `convert_to_fp8`: for each eligible nn.Linear it looks up the
layer's shape (tokens per micro-batch, in, out) in a crossover table measured on this GPU kind for
this recipe class (crossover.py; a shipped table or a start-up calibration, calibration.py) and
converts the layer only when the speedup reaches `min_speedup`. A layer kept in BF16 gets the
reason in the conversion report:

    skip layers.0.mlp.up_proj: bf16: 768->2048 at 16384 tokens measured 0.71x on NVIDIA H100 80GB
        HBM3 (delayed, recipes/crossover/h100.yaml); FP8 needs >= 1.00x

    PolicyMode.OFF        every eligible layer runs FP8 (the recipe as written)
    PolicyMode.TABLE      decide from the shipped table for this GPU; no table: every layer FP8, noted
    PolicyMode.CALIBRATE  measure this model's shapes at start-up (cached per GPU and torch version)

The policy never converts what the base filter keeps in high precision (embedding, LM head, router).
MoE expert layers (GroupedLinear) are judged by their own table, `grouped_table` (class
`grouped:<recipe class>`, measured on MoE blocks by benchmarks/bench_moe.py): their GEMM has
tokens x rows_per_token (top_k) rows over all experts. Without such a table they follow the recipe.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from enum import Enum

from torch import nn

from fp8train.nn.grouped_linear import GroupedLinear
from fp8train.numerics.convert import ModuleFilter, default_filter
from fp8train.numerics.crossover import CROSSOVER_DIR, CrossoverFile, CrossoverTable, GemmShape, find_table, \
    grouped_class, recipe_class, shipped_crossovers
from fp8train.numerics.recipe import Recipe
from fp8train.quant.config_values import parse_choice


class PolicyMode(str, Enum):
    OFF = "off"
    TABLE = "table"
    CALIBRATE = "calibrate"


def policy_mode(name: str, where: str = "precision_policy") -> PolicyMode:
    return parse_choice(PolicyMode, name, where)


@dataclass(frozen=True)
class LayerDecision:
    fqn: str
    shape: GemmShape
    fp8: bool
    speedup: float
    how: str
    grouped: bool = False  # an MoE expert layer (judged by the grouped table)


@dataclass
class PrecisionPolicy:
    """A `module_filter`: True (FP8) where the table's speedup reaches min_speedup, else the reason."""

    table: CrossoverTable | None
    tokens: int  # tokens per GEMM: micro-batch size x sequence length (per rank)
    min_speedup: float = 1.0
    base_filter: ModuleFilter = default_filter
    unavailable: str = ""  # why there is no table (shown in the report; every eligible layer runs FP8)
    grouped_table: CrossoverTable | None = None  # MoE expert layers; None: they follow the recipe
    decisions: list[LayerDecision] = field(default_factory=list)
    unjudged_grouped: int = 0  # expert layers converted as the recipe says (no grouped table)

    def __post_init__(self):
        if self.tokens < 1:
            raise ValueError(f"precision policy: tokens per GEMM must be >= 1, got {self.tokens}")
        if not self.min_speedup > 0:
            raise ValueError(f"precision policy: min_speedup must be > 0, got {self.min_speedup}")

    def __call__(self, fqn: str, module: nn.Module) -> bool | str:
        verdict = self.base_filter(fqn, module)
        if verdict is not True:
            return verdict
        if type(module) is GroupedLinear:
            if self.grouped_table is None:
                self.unjudged_grouped += 1
                return verdict
            shape = GemmShape(self.tokens * module.rows_per_token, module.in_features, module.out_features)
            return self._decide(fqn, shape, self.grouped_table, grouped=True)
        if self.table is None or type(module) is not nn.Linear:
            return verdict
        return self._decide(fqn, GemmShape(self.tokens, module.in_features, module.out_features), self.table)

    def _decide(self, fqn: str, shape: GemmShape, table: CrossoverTable, grouped: bool = False) -> bool | str:
        speedup, how = table.estimate(shape)
        fp8 = speedup >= self.min_speedup
        self.decisions.append(LayerDecision(fqn, shape, fp8, speedup, how, grouped))
        if fp8:
            return True
        return (f"bf16: {shape} {how} {speedup:.2f}x on {table.device} ({table.recipe_class}, "
                f"{table.source}); FP8 needs >= {self.min_speedup:.2f}x")

    def notes(self) -> list[str]:
        """One line per distinct shape for the conversion report, then the totals per table."""
        lines = [f"precision policy: {self.unavailable}"] if self.table is None and self.unavailable else []
        counts = Counter((d.shape, d.fp8, d.grouped) for d in self.decisions)
        seen = set()
        for d in self.decisions:
            key = (d.shape, d.fp8, d.grouped)
            if key in seen:
                continue
            seen.add(key)
            kind = "expert layers " if d.grouped else ""
            lines.append(f"precision policy: {'fp8' if d.fp8 else 'bf16'} for {kind}{d.shape} ({d.how} "
                         f"{d.speedup:.2f}x): {counts[key]} layer(s)")
        for table, grouped, what in ((self.table, False, "eligible layer(s)"),
                                     (self.grouped_table, True, "MoE expert layer(s)")):
            judged = [d for d in self.decisions if d.grouped == grouped]
            if table is not None and judged:
                lines.append(f"precision policy: {sum(d.fp8 for d in judged)} of {len(judged)} {what} in FP8 "
                             f"on {table.device} ({table.recipe_class}; {table.source}; FP8 where >= "
                             f"{self.min_speedup:.2f}x)")
        if self.unjudged_grouped:
            lines.append(f"precision policy: {self.unjudged_grouped} MoE expert layer(s) follow the recipe (no "
                         f"grouped crossover table for this GPU; benchmarks/bench_moe.py --crossover-out makes one)")
        return lines


def shipped_policy(device_name: str, recipe: Recipe, tokens: int, min_speedup: float = 1.0,
                   crossovers: list[CrossoverFile] | None = None) -> PrecisionPolicy:
    """The policy from the shipped tables (recipes/crossover/*.yaml, or `crossovers`) for this GPU
    and the recipe's class: the dense table and the MoE experts' `grouped:<class>` table."""
    crossovers = shipped_crossovers() if crossovers is None else crossovers
    klass = recipe_class(recipe)
    unavailable = (f"no crossover table for {device_name} / {klass} in {CROSSOVER_DIR}: every eligible layer "
                   f"runs FP8 (trainer.precision_policy=calibrate measures this GPU)")
    return PrecisionPolicy(find_table(crossovers, device_name, klass), tokens, min_speedup, unavailable=unavailable,
                           grouped_table=find_table(crossovers, device_name, grouped_class(klass)))
