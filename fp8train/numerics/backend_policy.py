"""Which GEMM backend runs a recipe, and why: the one policy, Transformer Engine included.

    requested   what the recipe (`backend:`) or the caller asks for: auto | te | scaled_mm | emulated
    te_fallback what to do when TE is asked for but cannot express the recipe: error | native

| requested | TE usable and recipe expressible | otherwise                                          |
|-----------|----------------------------------|----------------------------------------------------|
| te        | te                               | TE missing: error. Recipe inexpressible: error, or  |
|           |                                  | the native path with the reason (te_fallback=native)|
| auto      | te                               | scaled_mm if this GPU runs the recipe, else emulated|
| scaled_mm | -                                | scaled_mm, or an error naming what is missing       |
| emulated  | -                                | emulated                                            |

`choose_backend` returns the decision with a printable reason (the conversion report shows it);
the module swap and the trainer's start-up checks both ask it, so they can never disagree.
TE swaps whole modules (te_backend.py); the native backends plug into FP8Linear's GEMMs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fp8train.numerics import te_backend
from fp8train.numerics.gemm_backends import GEMM_BACKENDS, GemmBackend, scaled_mm_support
from fp8train.numerics.recipe import BACKENDS, Recipe

TE_FALLBACKS = ("error", "native")


@dataclass(frozen=True)
class BackendChoice:
    name: str  # "te", "scaled_mm" or "emulated"
    reason: str
    request: str  # what the native layers are built with (resolves to `name` again, same reason)
    te_recipe: object | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)


def native_backend(recipe: Recipe, requested: str) -> tuple[GemmBackend, str]:
    """The GEMM backend of an FP8Linear / FP8GroupedLinear: (backend, reason)."""
    if requested == "emulated":
        return GEMM_BACKENDS["emulated"](), "emulated: requested by the recipe/config"
    if requested == "te":
        raise ValueError("backend 'te' swaps whole modules to Transformer Engine; convert the model with "
                         "convert_to_fp8(model, recipe, backend='te') instead of building FP8 layers by hand")
    if requested not in BACKENDS:
        raise ValueError(f"unknown GEMM backend {requested!r}; choose one of {list(BACKENDS)}")
    ok, why = scaled_mm_support(recipe.gemm_class)
    if requested == "scaled_mm":
        if not ok:
            raise ValueError(f"backend 'scaled_mm' is not available: {why}; use backend=emulated or auto")
        return GEMM_BACKENDS["scaled_mm"](), why
    if ok:
        return GEMM_BACKENDS["scaled_mm"](), f"auto -> {why}"
    return GEMM_BACKENDS["emulated"](), f"auto -> emulated: {why}"


def choose_backend(recipe: Recipe, requested: str | None = None, te_fallback: str = "error") -> BackendChoice:
    """The backend for a model converted with `recipe` (see the table above); ValueError when
    the request cannot be met, naming what is missing and the fix."""
    requested = requested or recipe.backend
    if te_fallback not in TE_FALLBACKS:
        raise ValueError(f"te_fallback={te_fallback!r}; choose one of {list(TE_FALLBACKS)}")
    if requested not in BACKENDS:
        raise ValueError(f"unknown GEMM backend {requested!r}; choose one of {list(BACKENDS)}")
    notes: tuple[str, ...] = ()
    if requested in ("te", "auto"):
        te_recipe, note = _te_recipe(recipe, requested, te_fallback)
        if te_recipe is not None:
            return BackendChoice("te", f"te: Transformer Engine ({recipe.name})", "te", te_recipe)
        notes = (note,) if note else ()
        requested = "auto"
    backend, reason = native_backend(recipe, requested)
    return BackendChoice(backend.name, reason, requested, None, notes)


def _te_recipe(recipe: Recipe, requested: str, te_fallback: str):
    """(TE recipe object or None, note for the report)."""
    ok, why = te_backend.te_available()
    if not ok:
        if requested == "te":
            raise ValueError(f"backend=te is unavailable: {why}")
        return None, None
    try:
        return te_backend.te_recipe_for(recipe), None
    except te_backend.TEUnsupported as exc:
        if requested == "te" and te_fallback != "native":
            raise ValueError(f"{exc}. Set te_fallback=native to fall back to fp8train's native FP8 path") from exc
        return None, f"TE not used: {exc}; falling back to the native FP8 path"
