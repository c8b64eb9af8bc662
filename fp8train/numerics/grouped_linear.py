"""FP8GroupedLinear: the MoE experts' GroupedLinear with FP8 GEMMs (same recipes as FP8Linear).

Replaces fp8train.nn.GroupedLinear (the high-precision experts) in the module swap, keeping its
`weight` parameter [E, out, in] and `forward(x_sorted, group_sizes)` signature. The expert weights
are cast to FP8 once per optimizer step (one cast for all experts, with its transposed copy) and
cached exactly like FP8Linear's weight; under torch.compile or CUDA graphs they are cast in the
graph on every call, as FP8Linear's are.

Tensorwise and blockwise recipes run the grouped path (grouped_linear_function.py): one grouped
GEMM per pass for all experts, group sizes never leave the device, so torch.compile traces the
layer whole and `make_graphed_fp8` can capture it. Rowwise recipes and percentile-clipped inputs
keep the per-expert path (grouped_per_expert.py), eagerly, with one host sync per forward.

Cast once (grouped_dispatch.py): `prepare_sorted_tokens(x, token_index, group_sizes)` quantizes the
unsorted tokens and gathers FP8 rows; the MoE block hands the result to gate and up alike, and
`forward` accepts it in place of x_sorted.

`tokens_align` (None or 128) is the layout of the grad_weight GEMM's token-major operands
(grouped_layout.py): 128 pads every expert's tokens to whole 128-token chunks (zeros), which
blockwise needs and which lets the tensorwise grad_weight kernel read through TMA, so it is the
default on the kernel backend (scaled_mm); None keeps them ragged (the emulation's default: padding
buys it nothing). Tensorwise layers may switch it (`layer.tokens_align = None`); results are the same
up to the FP32 summation order of grad_weight.
"""

from __future__ import annotations

import torch
from torch import nn

from fp8train.numerics.backend_policy import native_backend
from fp8train.numerics.grouped_dispatch import SortedFP8Tokens, quantize_then_gather
from fp8train.numerics.grouped_gemm import ExpertOperand, stack_weight, stack_weight_cols
from fp8train.numerics.grouped_layout import gather_to_padded, padded_groups
from fp8train.numerics.grouped_linear_function import FP8GroupedLinearFunction
from fp8train.numerics.grouped_per_expert import FP8PerExpertLinearFunction
from fp8train.numerics.recipe import Recipe
from fp8train.numerics.role_caster import RoleCaster
from fp8train.numerics.weight_cache import FP8WeightCacheMixin, check_shape_for_recipe, token_multiple
from fp8train.quant.casts import record_amax
from fp8train.quant.schemes import BLOCK, GemmClass


def runs_grouped(recipe: Recipe) -> bool:
    """Grouped GEMMs for tensorwise and blockwise recipes. Rowwise cols scales run over ONE expert's
    tokens, and a percentile amax counts elements (other experts' tokens would move it): per expert."""
    if recipe.gemm_class is GemmClass.ROWWISE:
        return False
    return recipe.input.amax_percentile is None and recipe.grad_output.amax_percentile is None


TOKENS_ALIGNS = (None, BLOCK)


def default_tokens_align(recipe: Recipe, backend_name: str) -> int | None:
    """128 where the grad_weight operands must (blockwise: 128x1 tiles within one expert) or where it
    pays (tensorwise on the kernels: TMA needs whole 128-token chunks); else None (ragged)."""
    if recipe.gemm_class is GemmClass.BLOCKWISE or backend_name == "scaled_mm":
        return BLOCK
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
        self.grouped = runs_grouped(recipe)
        self.tokens_align = default_tokens_align(recipe, self.backend.name)
        self.cols_token_multiple = token_multiple(recipe)  # per-expert path
        self._cache_generation, self._weight_cache, self.weight_casts = 0, None, 0

    @property
    def tokens_align(self) -> int | None:
        """Alignment of every expert's tokens in the grad_weight operands (module docstring)."""
        return self._tokens_align

    @tokens_align.setter
    def tokens_align(self, value: int | None) -> None:
        if value not in TOKENS_ALIGNS:
            raise ValueError(f"tokens_align={value!r} is not one of {list(TOKENS_ALIGNS)}")
        if value is None and self.recipe.gemm_class is GemmClass.BLOCKWISE:
            raise ValueError(f"recipe {self.recipe.name!r} is blockwise: its 128x1 token tiles need "
                             f"tokens_align={BLOCK}, got None")
        self._tokens_align = value

    @classmethod
    def from_grouped(cls, module: nn.Module, recipe: Recipe, backend: str | None = None) -> "FP8GroupedLinear":
        return cls(module.weight, recipe, backend)

    def extra_repr(self) -> str:
        path = "grouped" if self.grouped else "per-expert"
        return (f"num_experts={self.num_experts}, in_features={self.in_features}, "
                f"out_features={self.out_features}, recipe={self.recipe.name}, backend={self.backend.name}, "
                f"path={path}")

    def fp8_weights(self, need_cols: bool = True) -> tuple[ExpertOperand, ExpertOperand | None]:
        """(W rows [E, N, K], W^T [E, K, N]): cast at most once per optimizer step (module docstring).
        A compiled forward casts every call, and only the rows when `need_cols` is False (its
        backward re-derives W^T: `recast_weight_cols`)."""
        if torch.compiler.is_compiling() or not self.cache_weight:
            return self._cast_weights(need_cols)
        key = self._cache_key()
        if self._weight_cache is not None and self._weight_cache[0] == key:
            return self._weight_cache[1], self._weight_cache[2]
        rows, cols = self._cast_weights()
        self.__dict__["weight_casts"] = self.weight_casts + 1
        self.__dict__["_weight_cache"] = (key, rows, cols)
        return rows, cols

    def recasts_weight_cols(self) -> bool:
        """True in a compiled forward: the FP8 W^T is not kept from forward to backward (1 byte per
        expert parameter at the peak); backward re-derives it from W, as the dense layer does."""
        return torch.compiler.is_compiling() and self.weight_caster.scheme.granularity.transposable

    @torch.no_grad()
    def recast_weight_cols(self, weight: torch.Tensor) -> ExpertOperand:
        """W^T [E, K, N], bit for bit the forward cast's transposed copy: the rows cast of W^T
        [K, E*N] with the same scale (tensorwise) or the same blocks (128x128), no amax record."""
        w_t = weight.detach().reshape(-1, self.in_features).t().contiguous()
        return stack_weight_cols(self.weight_caster.recast(w_t, need_cols=False)[0], self.num_experts)

    @torch.no_grad()
    def _cast_weights(self, need_cols: bool = True) -> tuple[ExpertOperand, ExpertOperand | None]:
        w = self.weight.detach()
        transposable = self.weight_caster.scheme.granularity.transposable
        rows, cols = self.weight_caster.cast(w.reshape(-1, self.in_features), need_cols=transposable and need_cols)
        if transposable:
            return stack_weight(rows, cols, self.num_experts)
        per_expert = [self.weight_caster.cast_cols(w[e]) for e in range(self.num_experts)]  # rowwise
        first = per_expert[0]
        cols = ExpertOperand(torch.stack([c.data for c in per_expert]), torch.stack([c.scale_inv for c in per_expert]),
                             first.granularity, first.fmt)
        return stack_weight(rows, None, self.num_experts)[0], cols

    def forward(self, x: torch.Tensor | SortedFP8Tokens, group_sizes: torch.Tensor) -> torch.Tensor:
        if isinstance(x, SortedFP8Tokens):
            return self._forward_sorted(x, group_sizes)
        if x.dim() != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"FP8GroupedLinear expects input [T, {self.in_features}], got {tuple(x.shape)}")
        self._check_group_sizes(group_sizes, x.shape[0])
        if not self.grouped:
            return self._forward_per_expert(x, group_sizes)
        return FP8GroupedLinearFunction.apply(x, self.weight, group_sizes, self, self._needs_weight_grad())

    def _needs_weight_grad(self) -> bool:
        return torch.is_grad_enabled() and self.weight.requires_grad

    # rowwise / percentile: group sizes on the host, so torch.compile runs this part eagerly
    @torch.compiler.disable
    def _forward_per_expert(self, x: torch.Tensor, group_sizes: torch.Tensor) -> torch.Tensor:
        return FP8PerExpertLinearFunction.apply(x, self.weight, group_sizes, self, self._needs_weight_grad())

    def _check_group_sizes(self, group_sizes: torch.Tensor, tokens: int) -> None:
        """Shape always; the sum only where it is free to read (CPU, eager): on the GPU that would be
        a host sync, and rows past the groups' end simply come back as zeros."""
        if group_sizes.shape != (self.num_experts,):
            raise ValueError(f"group_sizes must have shape ({self.num_experts},), got {tuple(group_sizes.shape)}")
        if group_sizes.device.type == "cpu" and not torch.compiler.is_compiling():
            total = int(group_sizes.sum())
            if total != tokens:
                raise ValueError(f"group_sizes sum to {total} but the input has {tokens} rows")

    def prepare_sorted_tokens(self, x: torch.Tensor, token_index: torch.Tensor,
                              group_sizes: torch.Tensor) -> torch.Tensor | SortedFP8Tokens:
        """The dispatched tokens x[token_index] for this layer and any other reading them: FP8 rows cast
        once before the permutation (grouped path), else the high-precision rows."""
        if not self.grouped or x.dim() != 2 or x.shape[1] != self.in_features:
            return x[token_index]
        need_cols = self._needs_weight_grad()
        align = self.tokens_align if need_cols else None  # the layout of the token-major copy only
        groups = None if align is None else padded_groups(group_sizes, token_index.shape[0], align)

        def token_tiles(x_flat):  # 128x1 token tiles (one expert's tokens per tile), from x [N, K]
            return self.input_caster.cast_cols(gather_to_padded(x_flat, token_index, groups))
        return quantize_then_gather(self.input_caster, x, token_index, need_cols, token_tiles, groups)

    def _forward_sorted(self, tokens: SortedFP8Tokens, group_sizes: torch.Tensor) -> torch.Tensor:
        need_cols = self._needs_weight_grad()
        cols_ok = tokens.cols is not None and tokens.cols_align == self.tokens_align
        if not (self.grouped and tokens.caster.config == self.input_caster.config
                and tokens.rows.shape[1] == self.in_features and (cols_ok or not need_cols)):
            return self.forward(tokens.materialize(), group_sizes)
        self._check_group_sizes(group_sizes, tokens.rows.shape[0])
        slot = self.input_caster._amax_slot()
        if tokens.caster is not self.input_caster and slot is not None:  # this layer's input amax too
            record_amax(slot, tokens.caster.amax_history[0:1])
        rows, cols = tokens.rows, (tokens.cols if need_cols else None)
        cols_data = None if cols is None else cols.data
        # a tensor passed twice breaks Dynamo's autograd.Function tracing: a shared scale goes once
        cols_scale = None if cols is None or cols.scale_inv is rows.scale_inv else cols.scale_inv
        return FP8GroupedLinearFunction.apply(tokens.carrier, self.weight, group_sizes, self, need_cols, rows.data,
                                              rows.scale_inv, cols_data, cols_scale)


def describe_grouped_gemms(model: nn.Module) -> str:
    """How the model's FP8 grouped layers run their GEMMs (benchmarks, reports)."""
    lines = set()
    for m in model.modules():
        if isinstance(m, FP8GroupedLinear):
            r = m.recipe
            fmt = {role: getattr(r, role).format.upper() for role in ("input", "weight", "grad_output")}
            pairs = (f"output {fmt['input']}x{fmt['weight']}, grad_input {fmt['grad_output']}x{fmt['weight']}, "
                     f"grad_weight {fmt['grad_output']}x{fmt['input']}")
            how = "one grouped GEMM per pass for all experts" if m.grouped else "per-expert GEMM loop"
            layout = "ragged" if m.tokens_align is None else f"padded to {m.tokens_align}"
            lines.add(f"{how} ({m.backend.name}, {r.gemm_class.value}): {pairs}; grad_weight tokens {layout}")
    return " | ".join(sorted(lines)) if lines else "no FP8 grouped layers"
