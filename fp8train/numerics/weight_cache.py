"""What FP8Linear and FP8GroupedLinear share: shape rules, the output dtype and the weight-cache key.

Each optimizer step the FP8 layers cast their weight ONCE and cache the FP8 copies for every
micro-batch and for backward. A stale copy is never used: the cache key holds the layer's cache
generation (bumped by `invalidate_weight_cache()`, which `after_optimizer_step` and the optimizer
hook call) and the weight's storage pointer, dtype, device and autograd version counter, so an
in-place write through the parameter (`weight.add_`, `weight.copy_`) also forces a re-cast.

Under DeepSpeed ZeRO-3 the parameter is a partitioned one (it has a `ds_id`): DeepSpeed all-gathers
it into a NEW buffer before each module's forward and frees that buffer afterwards, so its storage
pointer changes at every gather and a key on it missed the cache at every micro-batch (with 2
ranks, half the layers of the tiny model cast their weight twice per optimizer step of 2
micro-batches; tests/train/test_zero3_weight_cache.py counts it). For such a parameter the key holds the
rank's own partition (`ds_tensor`: the storage the ZeRO-3 optimizer writes the updated weights
into, stable across gathers) instead: one cast per optimizer step, as under ZeRO-1/2 and as
Transformer Engine's `is_first_microbatch` does. A weight change still always re-casts: the
optimizer step bumps the generation (after_optimizer_step / the optimizer hook), and a write into
the partition (a checkpoint load, a GatheredParameters edit re-partitioned by DeepSpeed) moves its
version counter.
"""

from __future__ import annotations

import torch

from fp8train.numerics.recipe import Recipe
from fp8train.quant.schemes import BLOCK, GemmClass

_OUTPUT_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def check_shape_for_recipe(in_features: int, out_features: int, recipe: Recipe) -> None:
    """Raise ValueError when the recipe cannot quantize a weight of this shape."""
    if recipe.gemm_class is GemmClass.BLOCKWISE:
        for name, dim in (("in_features", in_features), ("out_features", out_features)):
            if dim % BLOCK:
                raise ValueError(f"recipe {recipe.name!r} (blockwise) needs {name}={dim} to be a multiple "
                                 f"of {BLOCK}; skip this layer or choose a size divisible by {BLOCK}")


def token_multiple(recipe: Recipe) -> int:
    """Tokens per GEMM must be a multiple of this (128x1 token tiles of blockwise wgrad operands)."""
    return BLOCK if recipe.gemm_class is GemmClass.BLOCKWISE else 1


class FP8WeightCacheMixin:
    """Output dtype rule and weight-cache bookkeeping of the FP8 layers."""

    def output_dtype(self, input_dtype: torch.dtype) -> torch.dtype:
        return _OUTPUT_DTYPES.get(self.recipe.output_dtype, input_dtype)

    # False: cast the weight on every call (CUDA graphs: a replay cannot consult a Python cache)
    cache_weight = True

    def invalidate_weight_cache(self) -> None:
        # plain attributes, written past nn.Module.__setattr__ (its type checks cost host time
        # on every step of every layer)
        self.__dict__["_cache_generation"] = self._cache_generation + 1
        self.__dict__["_weight_cache"] = None

    def _cache_key(self) -> tuple:
        w = self.weight
        partition = getattr(w, "ds_tensor", None)  # a ZeRO-3 partitioned parameter: key on its partition
        if partition is not None:
            return (self._cache_generation, "zero3", partition.data_ptr(), partition._version, w.dtype, w.device)
        return (self._cache_generation, w.data_ptr(), w.dtype, w._version, w.device)
