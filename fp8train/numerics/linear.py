"""FP8Linear: an nn.Linear whose three GEMMs run in FP8, with an FP8 working-weight cache.

The parameters stay what they were (FP32 master weights in plain PyTorch, or the engine's BF16
copies under DeepSpeed, whose optimizer keeps the FP32 master). Each optimizer step the weight is
cast to FP8 ONCE: the FP8 copies (W_rows for the forward GEMM, W_cols for grad_input) are cached
and reused by every gradient-accumulation micro-batch and by backward.

A stale FP8 weight is never used. The cache key holds
    * the layer's cache generation, bumped by `invalidate_weight_cache()`, which
      `after_optimizer_step(model)` and the optimizer step hook (`attach_optimizer`) call, and
    * the weight's storage pointer, dtype and autograd version counter, so any in-place write
      through the parameter (`weight.add_`, `weight.copy_`) also forces a re-cast.

`weight_transform` (None by default) is a slot for a module applied to the high-precision weight
before its FP8 cast: QAT puts its fake quantizer there (fp8train.qat), so the FP8 GEMMs see
cast(fake_quantize(W)) and the gradient still reaches W unchanged (grad_weight = dY^T X never
reads W). Changing the slot must be followed by `invalidate_weight_cache()`.
"""

from __future__ import annotations

import torch
from torch import nn

from fp8train.numerics.backend_policy import native_backend
from fp8train.numerics.gemm_backends import ScaledMMBackend, dense_fallback_note
from fp8train.numerics.linear_function import FP8LinearFunction, cast_input, recasts_input_cols
from fp8train.numerics.recipe import Recipe
from fp8train.numerics.role_caster import RoleCaster
from fp8train.numerics.weight_cache import FP8WeightCacheMixin, check_shape_for_recipe, token_multiple
from fp8train.quant.tensor import QuantizedTensor


class FP8Linear(FP8WeightCacheMixin, nn.Linear):
    """nn.Linear with FP8 GEMMs per `recipe`; state (amax histories, scales) in persistent buffers."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, recipe: Recipe,
                 backend: str | None = None, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        check_shape_for_recipe(in_features, out_features, recipe)
        self.recipe = recipe
        self.input_caster = RoleCaster("input", recipe.input)
        self.weight_caster = RoleCaster("weight", recipe.weight)
        self.grad_output_caster = RoleCaster("grad_output", recipe.grad_output)
        self.backend, self.backend_reason = native_backend(recipe, backend or recipe.backend)
        if isinstance(self.backend, ScaledMMBackend):
            self.backend_reason += dense_fallback_note(recipe)
        self.token_multiple = token_multiple(recipe)
        self._cache_generation = 0
        self._weight_cache: tuple[tuple, QuantizedTensor, QuantizedTensor] | None = None
        self.weight_casts = 0  # how many times the weight was really cast (tests and telemetry)
        self.weight_transform: nn.Module | None = None  # applied to W before its cast (QAT)

    @classmethod
    def from_linear(cls, linear: nn.Linear, recipe: Recipe, backend: str | None = None) -> "FP8Linear":
        """Wrap an existing nn.Linear, keeping its Parameter objects (optimizers stay valid)."""
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, recipe=recipe,
                    backend=backend, device="meta")
        layer.weight, layer.bias = linear.weight, linear.bias
        device = linear.weight.device
        for caster in (layer.input_caster, layer.weight_caster, layer.grad_output_caster):
            caster.to_empty(device=device)
            for buf_name, buf in caster.named_buffers():
                buf.fill_({"amax_history": 0.0, "fp8_max": caster.fmt.max}.get(buf_name, 1.0))
        return layer

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, recipe={self.recipe.name}, backend={self.backend.name}"

    def fp8_weight(self, need_cols: bool = True) -> tuple[QuantizedTensor, QuantizedTensor | None]:
        """(W_rows, W_cols): cast at most once per optimizer step, re-cast if the weight changed.

        Under torch.compile the cache (Python state keyed on storage and version) cannot live in
        a graph: a compiled forward casts the weight every call, like a CUDA-graphed one, and
        only W_rows when `need_cols` is False (the compiled backward re-derives W_cols)."""
        if torch.compiler.is_compiling():  # a traced graph casts the weight itself, every call
            with torch.no_grad():
                return self.weight_caster.cast(self._weight_to_cast(), need_cols=need_cols)
        key = self._cache_key() if self.cache_weight else None
        if key is not None and self._weight_cache is not None and self._weight_cache[0] == key:
            return self._weight_cache[1], self._weight_cache[2]
        with torch.no_grad():
            w_rows, w_cols = self.weight_caster.cast(self._weight_to_cast(), need_cols=True)
        self.__dict__["weight_casts"] = self.weight_casts + 1
        self.__dict__["_weight_cache"] = (key, w_rows, w_cols) if key is not None else None
        return w_rows, w_cols

    def _weight_to_cast(self) -> torch.Tensor:
        weight = self.weight.detach()
        return weight if self.weight_transform is None else self.weight_transform(weight)

    def shared_input(self, x: torch.Tensor, layers) -> tuple | None:
        """Cast x ONCE for all `layers` reading it (q/k/v, gate/up; fp8train.nn.apply_to_same_input),
        or None when they cannot share (not all FP8Linear of this recipe and width).

        The cast is this layer's (its input caster, its delayed scale: the members' scales are
        equal, they see the same inputs) and the others record what it recorded (RoleCaster.follow),
        so outputs, gradients and FP8 state are what separate casts give, bit for bit; the group
        saves one FP8 copy of x for backward instead of one per layer, and launches one cast."""
        if not all(type(m) is type(self) and m.recipe is self.recipe and m.in_features == self.in_features
                   for m in layers):
            return None
        self._check_input(x)
        need_cols = torch.is_grad_enabled() and any(m.weight.requires_grad for m in layers) \
            and not recasts_input_cols(self)  # a compiled backward re-derives delayed X_cols
        with torch.no_grad():
            rows, cols = cast_input(self, x, need_cols)
        for member in layers:
            if member is not self:
                member.input_caster.follow(self.input_caster)
        if cols is None:  # the leader (self) travels along: a compiled backward recasts with its caster
            return self, rows.data, rows.scale_inv, None, None
        # tensorwise rows and cols share one scale tensor: pass it once (Dynamo cannot trace an
        # autograd.Function given the same tensor twice)
        return self, rows.data, rows.scale_inv, cols.data, None if cols.scale_inv is rows.scale_inv else cols.scale_inv

    def _check_input(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"FP8Linear expected input with last dimension {self.in_features}, "
                             f"got shape {tuple(x.shape)}")
        if self.recipe.padding == "none" and self.token_multiple > 1 and x.numel() // x.shape[-1] % self.token_multiple:
            raise ValueError(f"recipe {self.recipe.name!r}: {x.numel() // x.shape[-1]} tokens is not a multiple "
                             f"of {self.token_multiple}; set recipe padding: zero or change batch/sequence size")

    # torch.compile traces this layer as part of the model's graph: the casts are custom operators
    # (kernels/library.py), the GEMMs aten ops, and the weight is cast inside the graph (fp8_weight).
    def forward(self, x: torch.Tensor, shared_input: tuple | None = None) -> torch.Tensor:
        if shared_input is None:
            self._check_input(x)
            return FP8LinearFunction.apply(x, self.weight, self.bias, self)
        return FP8LinearFunction.apply(x, self.weight, self.bias, self, *shared_input)
