"""Recipes are data: per operand role, an FP8 format and a scaling mode.

A recipe says, for each of the three operands of a linear layer's GEMMs,

    input        X   (activations entering the layer)
    weight       W   (the FP8 working copy of the FP32 master weight)
    grad_output  dY  (the gradient arriving from the layer above)

which format (e4m3 | e5m2) it is cast to and how its scale is chosen:

    delayed    per-tensor scale from an amax HISTORY of earlier steps (Transformer Engine's
               DelayedScaling: history_len, amax_compute_algo max|most_recent, margin)
    current    per-tensor scale from this tensor's own amax (optionally a power of two)
    rowwise    one scale per row along the GEMM's inner (contraction) dimension
    blockwise  DeepSeek-V3: 1x128 tiles for activations and activation gradients, 128x128
               blocks for weights, online (current) amax, optionally power-of-two scales

What each name means (scaling mode, granularity of each operand, kernels) is ONE table in the
quantization core, fp8train/quant/schemes.py. `delayed` and `current` are both *tensorwise*; a
GEMM multiplies operands of one class, so all three roles must share a class (tensorwise, rowwise
or blockwise).

Presets live as YAML files in the repository's recipes/ folder; a new recipe is a new file.
Unknown keys and impossible combinations raise ValueError naming the key.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fp8train.quant.config_values import preset_file
from fp8train.quant.formats import NumberFormat, fp8_format
from fp8train.quant.scaling import DELAYED_ALGOS
from fp8train.quant.schemes import CastScheme, GemmClass, RecipeScaling, recipe_scaling, scheme_for

ROLES = ("input", "weight", "grad_output")
BACKENDS = ("auto", "emulated", "scaled_mm", "te")
PADDINGS = ("none", "zero")
OUTPUT_DTYPES = ("auto", "bf16", "fp32")
RECIPES_DIR = Path(__file__).resolve().parents[2] / "recipes"


@dataclass(frozen=True)
class RoleConfig:
    """How one operand role is cast to FP8."""

    format: str = "e4m3"
    scaling: str = "delayed"
    history_len: int = 1024
    amax_compute_algo: str = "max"
    margin: float = 0.0
    power_of_2: bool = False
    amax_percentile: float | None = None

    @property
    def fp8(self) -> NumberFormat:
        return fp8_format(self.format)

    @property
    def recipe_scaling(self) -> RecipeScaling:
        return recipe_scaling(self.scaling)

    def scheme(self, role: str) -> CastScheme:
        """Mode, granularity and kernels of this role's casts (the core's table)."""
        return scheme_for(self.recipe_scaling, role)

    def validate(self, role: str) -> None:
        where = f"recipe.{role}"
        try:
            fp8_format(self.format)
        except ValueError as error:
            raise ValueError(f"{where}.format: {error}") from None
        recipe_scaling(self.scaling, f"{where}.scaling")
        _check_choice(f"{where}.amax_compute_algo", self.amax_compute_algo, DELAYED_ALGOS)
        if not isinstance(self.history_len, int) or self.history_len < 1:
            raise ValueError(f"{where}.history_len must be an integer >= 1, got {self.history_len!r}")
        if not (isinstance(self.margin, (int, float)) and self.margin >= 0):
            raise ValueError(f"{where}.margin must be a number >= 0, got {self.margin!r}")
        if self.amax_percentile is not None:
            if role != "input":
                raise ValueError(f"{where}.amax_percentile: percentile clipping applies to activations "
                                 f"(recipe.input) only, not to {role}")
            if self.recipe_scaling not in (RecipeScaling.DELAYED, RecipeScaling.CURRENT):
                raise ValueError(f"{where}.amax_percentile needs per-tensor scaling (delayed|current), "
                                 f"got scaling={self.scaling!r}")
            if not 0.0 < float(self.amax_percentile) <= 100.0:
                raise ValueError(f"{where}.amax_percentile must be in (0, 100], got {self.amax_percentile!r}")


@dataclass(frozen=True)
class Recipe:
    """A complete FP8 recipe: one RoleConfig per operand role plus GEMM-level options."""

    name: str
    enabled: bool = True
    description: str = ""
    backend: str = "auto"
    output_dtype: str = "auto"
    padding: str = "none"
    input: RoleConfig = field(default_factory=RoleConfig)
    weight: RoleConfig = field(default_factory=RoleConfig)
    grad_output: RoleConfig = field(default_factory=lambda: RoleConfig(format="e5m2"))

    def role(self, name: str) -> RoleConfig:
        return getattr(self, name)

    @property
    def gemm_class(self) -> GemmClass:
        """tensorwise | rowwise | blockwise: the scaling class every GEMM of this recipe uses."""
        return self.input.scheme("input").gemm_class

    def validate(self) -> "Recipe":
        _check_choice("recipe.backend", self.backend, BACKENDS)
        _check_choice("recipe.output_dtype", self.output_dtype, OUTPUT_DTYPES)
        _check_choice("recipe.padding", self.padding, PADDINGS)
        for role in ROLES:
            self.role(role).validate(role)
        classes = {role: self.role(role).scheme(role).gemm_class.value for role in ROLES}
        if len(set(classes.values())) > 1:
            raise ValueError(f"recipe {self.name!r}: all roles must share one scaling granularity "
                             f"(tensorwise=delayed|current, rowwise, blockwise) because each GEMM "
                             f"multiplies two of them; got {classes}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check_choice(key: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{key}={value!r} is not allowed; choose one of {list(allowed)}")


def _role_from_dict(role: str, raw: Any) -> RoleConfig:
    if not isinstance(raw, dict):
        raise ValueError(f"recipe.{role} must be a mapping of role settings, got {type(raw).__name__}")
    allowed = {f.name for f in dataclasses.fields(RoleConfig)}
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in recipe.{role}; allowed keys: {sorted(allowed)}")
    return RoleConfig(**raw)


def recipe_from_dict(raw: dict[str, Any]) -> Recipe:
    """Build and validate a Recipe from plain data (a parsed YAML file or a Hydra node)."""
    if not isinstance(raw, dict):
        raise ValueError(f"a recipe must be a mapping, got {type(raw).__name__}")
    allowed = {f.name for f in dataclasses.fields(Recipe)}
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in recipe {raw.get('name', '?')!r}; "
                         f"allowed keys: {sorted(allowed)}")
    if "name" not in raw:
        raise ValueError("a recipe needs a 'name'")
    values = {k: v for k, v in raw.items() if k not in ROLES}
    roles = {role: _role_from_dict(role, raw[role]) for role in ROLES if role in raw}
    return Recipe(**values, **roles).validate()


def list_recipes(directory: Path = RECIPES_DIR) -> list[str]:
    """Names of the preset recipes shipped in recipes/*.yaml."""
    return sorted(p.stem for p in directory.glob("*.yaml"))


def load_recipe(name_or_path: str | Path, directory: Path = RECIPES_DIR) -> Recipe:
    """Load a preset by name (recipes/<name>.yaml) or a recipe YAML file by path."""
    raw = yaml.safe_load(preset_file(name_or_path, directory, "recipe").read_text())
    return recipe_from_dict(raw)
