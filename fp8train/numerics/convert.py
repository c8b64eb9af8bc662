"""Module swap: convert a model's nn.Linear layers to FP8Linear by recipe and filter.

    report = convert_to_fp8(model, load_recipe("blockwise"))
    print(report)   # what was converted, what was skipped and why

By default the layers DeepSeek-V3 kept in high precision stay there: the embedding, the LM head
(`lm_head`, `output`) and the MoE router/gate (`router`, `gate`), matched on the module's own name.
Shapes the recipe cannot quantize (blockwise needs multiples of 128) are skipped with the reason.
A custom `module_filter(fqn, module)` returns True to convert, or False / a reason string to skip.
The swap keeps the Parameter objects, so an optimizer built before the swap stays valid.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from torch import nn

from fp8train.nn.grouped_linear import GroupedLinear
from fp8train.numerics import te_backend
from fp8train.numerics.backend_policy import BackendChoice, choose_backend
from fp8train.numerics.grouped_linear import FP8GroupedLinear
from fp8train.numerics.linear import FP8Linear
from fp8train.numerics.recipe import Recipe
from fp8train.numerics.weight_cache import check_shape_for_recipe

HIGH_PRECISION_NAMES = ("embed", "embedding", "lm_head", "output", "router", "gate")
ModuleFilter = Callable[[str, nn.Module], "bool | str"]
CONVERTIBLE = (nn.Linear, GroupedLinear)  # exact types: an FP8 layer is never converted twice


@dataclass
class ConversionReport:
    recipe: str
    converted: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    backend: str = ""
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"FP8 recipe {self.recipe!r}: converted {len(self.converted)} layer(s), "
                 f"skipped {len(self.skipped)}; backend: {self.backend or 'n/a'}"]
        lines += [f"  note: {note}" for note in self.notes]
        lines += [f"  skip {name}: {why}" for name, why in self.skipped]
        return "\n".join(lines)


def default_filter(fqn: str, module: nn.Module) -> bool | str:
    leaf = fqn.rsplit(".", 1)[-1]
    if leaf in HIGH_PRECISION_NAMES:
        return f"'{leaf}' stays in high precision (embedding / LM head / router, as in DeepSeek-V3)"
    return True


def _convert_one(module: nn.Module, recipe: Recipe, choice: BackendChoice) -> nn.Module:
    if choice.name == "te":
        if isinstance(module, nn.Linear):
            return te_backend.TELinear(module, choice.te_recipe, recipe.name)
        return te_backend.TEGroupedLinear(module, choice.te_recipe, recipe.name)
    if isinstance(module, nn.Linear):
        check_shape_for_recipe(module.in_features, module.out_features, recipe)
        return FP8Linear.from_linear(module, recipe, choice.request)
    return FP8GroupedLinear.from_grouped(module, recipe, choice.request)


def convert_to_fp8(model: nn.Module, recipe: Recipe, module_filter: ModuleFilter | None = None,
                   backend: str | None = None, te_fallback: str = "error") -> ConversionReport:
    """Swap eligible layers in place; returns what was converted and what was skipped (with why).

    The backend is decided once for the model by backend_policy.choose_backend (TE included)."""
    report = ConversionReport(recipe=recipe.name)
    if not recipe.enabled:
        report.skipped.append(("*", f"recipe {recipe.name!r} has FP8 disabled"))
        return report
    choice = choose_backend(recipe, backend, te_fallback)
    report.notes.extend(choice.notes)
    module_filter = module_filter or default_filter
    candidates = [(fqn, m) for fqn, m in model.named_modules() if type(m) in CONVERTIBLE and fqn]
    for fqn, module in candidates:
        verdict = module_filter(fqn, module)
        if verdict is not True:
            report.skipped.append((fqn, verdict if isinstance(verdict, str) else "excluded by module_filter"))
            continue
        try:
            new = _convert_one(module, recipe, choice)
        except ValueError as exc:
            report.skipped.append((fqn, str(exc)))
            continue
        parent_name, _, leaf = fqn.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, leaf, new)
        report.converted.append(fqn)
        report.backend = new.backend_reason
    return report


def describe_backend(model: nn.Module) -> str:
    """Which GEMM backend(s) the FP8 layers use, and why."""
    reasons = sorted({m.backend_reason for m in model.modules() if hasattr(m, "backend_reason")})
    return "; ".join(reasons) if reasons else "no FP8 layers (high precision GEMMs)"
