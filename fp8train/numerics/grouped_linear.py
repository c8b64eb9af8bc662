"""FP8GroupedLinear: the MoE experts' GroupedLinear with FP8 GEMMs (same recipes as FP8Linear).

Replaces fp8train.nn.GroupedLinear (the high-precision experts) in the module swap, keeping its `weight` parameter
[E, out, in] and `forward(x_sorted, group_sizes)` signature. The expert weights are cast to FP8
once per optimizer step (one cast for all experts) and cached exactly like FP8Linear's weight.

`group_align` picks the grouped function's layout (see grouped_linear_function.py): tensorwise recipes
pad every expert's rows to 16 (cuBLAS FP8 alignment), blockwise recipes to 128 (a 128x1 token tile
never straddles two experts); both then quantize all tokens at once. Rowwise recipes, and inputs
with percentile clipping, keep the per-expert path (`group_align = None`).
"""

from __future__ import annotations

import torch
from torch import nn

from fp8train.numerics.backend_policy import native_backend
from fp8train.numerics.grouped_gemm import plan_grouped_gemms
from fp8train.numerics.grouped_layout import TENSORWISE_ALIGN
from fp8train.numerics.grouped_linear_function import FP8GroupedLinearFunction
from fp8train.numerics.recipe import Recipe
from fp8train.numerics.role_caster import RoleCaster
from fp8train.numerics.weight_cache import FP8WeightCacheMixin, check_shape_for_recipe, token_multiple
from fp8train.quant.schemes import BLOCK, GemmClass
from fp8train.quant.tensor import QuantizedTensor


def group_alignment(recipe: Recipe) -> int | None:
    """Rows each expert group is padded to in the aligned layout; None selects the per-expert path.

    Rowwise cols scales run per column over ONE expert's tokens, and a percentile amax counts
    elements (padding zeros would move it): both need the per-expert casts.
    """
    if recipe.gemm_class is GemmClass.BLOCKWISE:
        return BLOCK
    if recipe.gemm_class is GemmClass.TENSORWISE and recipe.input.amax_percentile is None:
        return TENSORWISE_ALIGN
    return None


class FP8GroupedLinear(FP8WeightCacheMixin, nn.Module):
    """E expert linears (weight [E, out, in]) whose GEMMs run in FP8 per `recipe`."""

    def __init__(self, weight: nn.Parameter, recipe: Recipe, backend: str | None = None):
        super().__init__()
        self.num_experts, self.out_features, self.in_features = weight.shape
        check_shape_for_recipe(self.in_features, self.out_features, recipe)
        self.weight, self.recipe = weight, recipe
        self.input_caster = RoleCaster("input", recipe.input).to(weight.device)
        self.weight_caster = RoleCaster("weight", recipe.weight).to(weight.device)
        self.grad_output_caster = RoleCaster("grad_output", recipe.grad_output).to(weight.device)
        self.backend, self.backend_reason = native_backend(recipe, backend or recipe.backend)
        self.group_align = group_alignment(recipe)
        self.cols_token_multiple = token_multiple(recipe)  # per-expert path
        self._cache_generation, self._weight_cache, self.weight_casts = 0, None, 0

    @classmethod
    def from_grouped(cls, module: nn.Module, recipe: Recipe, backend: str | None = None) -> "FP8GroupedLinear":
        return cls(module.weight, recipe, backend)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, in_features={self.in_features}, "
                f"out_features={self.out_features}, recipe={self.recipe.name}, backend={self.backend.name}, "
                f"group_align={self.group_align}")

    def fp8_weights(self) -> tuple[list[QuantizedTensor], list[QuantizedTensor]]:
        """Per-expert (W_e_rows, W_e_cols), cast once per optimizer step."""
        w, key = self.weight, self._cache_key()
        if self._weight_cache is not None and self._weight_cache[0] == key:
            return self._weight_cache[1], self._weight_cache[2]
        with torch.no_grad():
            rows_all, _ = self.weight_caster.cast(w.detach().reshape(-1, self.in_features), need_cols=False)
            n = self.out_features
            rows = [rows_all.rows(e * n, n) for e in range(self.num_experts)]
            if rows_all.granularity.transposable:
                cols = [r.t() for r in rows]
            else:
                cols = [self.weight_caster.cast_cols(w.detach()[e]) for e in range(self.num_experts)]
        self.weight_casts += 1
        self._weight_cache = (key, rows, cols)
        return rows, cols

    # torch.compile runs the model around this layer: the FP8 path (its weight cache and amax
    # bookkeeping are side effects Dynamo cannot trace yet) stays eager, a graph break per layer.
    @torch.compiler.disable
    def forward(self, x: torch.Tensor, group_sizes: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"FP8GroupedLinear expects input [T, {self.in_features}], got {tuple(x.shape)}")
        if group_sizes.shape != (self.num_experts,):
            raise ValueError(f"group_sizes must have shape ({self.num_experts},), got {tuple(group_sizes.shape)}")
        return FP8GroupedLinearFunction.apply(x, self.weight, group_sizes, self)


def describe_grouped_gemms(model: nn.Module, input_dtype: torch.dtype) -> str:
    """One line per distinct grouped-GEMM plan among the model's FP8 grouped layers (benchmarks)."""
    plans = {plan_grouped_gemms(m, input_dtype, m.weight.dtype, m.weight.device).describe()
             for m in model.modules() if isinstance(m, FP8GroupedLinear)}
    return " | ".join(sorted(plans)) if plans else "no FP8 grouped layers"
