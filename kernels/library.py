"""The quantization kernels as PyTorch custom operators, so `torch.compile` can trace FP8 layers.

Dynamo cannot look inside our launch wrappers (argument checks, cached device queries, Triton's
launcher), and it must not: an operator is the unit it understands. Each function of `kernels.ops`
used by a layer is registered here as `torch.ops.fp8train.<name>` with

* the real implementation: `kernels.ops` itself (Triton on CUDA, the torch fallback elsewhere),
* a fake implementation: empty outputs with the exact shapes, dtypes and strides (the blockwise
  scales are "outer-dimension major", as the GEMM wants them), which is all the compiler needs to
  plan the graph around the call,
* no mutation: the delayed cast returns its amax (`cast_with_amax_tiles`: as int32 bits per tile,
  so nothing is zero-filled before the launch) and the caller reduces and records it into slot 0
  of the amax history with ordinary torch ops, which the compiler can fuse into one kernel. (An
  operator that wrote the slot itself, like the eager one-launch `delayed_cast`, was miscompiled
  on torch 2.13: the slots are views into one flat bank tensor, and AOTAutograd's handling of a
  custom op mutating one of several aliased inputs handed it an empty view in inference graphs.)

Operators cannot return None: a transposed copy that was not asked for comes back as an empty
[0] tensor.
Eager code keeps calling `kernels.ops` directly: going through the dispatcher costs host time and
buys nothing there (fp8train.quant.casts picks the operator only while compiling).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fp8train.quant.schemes import BLOCK
from kernels import ops
from kernels.fallback import amax_tile_count

_NONE = (0,)  # shape of the placeholder for "not computed"


def _or_empty(t: Tensor | None, like: Tensor) -> Tensor:
    return t if t is not None else like.new_empty(_NONE)


@torch.library.custom_op("fp8train::cast_with_amax_tiles", mutates_args=())
def cast_with_amax_tiles(x_hp: Tensor, scale: Tensor, fp8_dtype: torch.dtype,
                         with_transpose: bool) -> tuple[Tensor, Tensor, Tensor]:
    """ops.cast_with_amax_tiles: (q, q_t or [0], int32 amax bits per tile); the caller reduces
    and records them (fused into one kernel by Inductor: no memset, no separate max)."""
    q, q_t, tiles = ops.cast_with_amax_tiles(x_hp, scale, fp8_dtype, with_transpose)
    return q, _or_empty(q_t, q), tiles


@cast_with_amax_tiles.register_fake
def _(x_hp, scale, fp8_dtype, with_transpose):
    m, k = x_hp.shape
    q = x_hp.new_empty((m, k), dtype=fp8_dtype)
    q_t = x_hp.new_empty((k, m) if with_transpose else _NONE, dtype=fp8_dtype)
    return q, q_t, x_hp.new_empty((amax_tile_count(m, k),), dtype=torch.int32)


@torch.library.custom_op("fp8train::current_cast", mutates_args=())
def current_cast(x_hp: Tensor, fp8_dtype: torch.dtype, power_of_2: bool,
                 with_transpose: bool) -> tuple[Tensor, Tensor, Tensor]:
    """ops.current_cast."""
    q, q_t, scale_inv = ops.current_cast(x_hp, fp8_dtype, power_of_2, with_transpose)
    return q, _or_empty(q_t, q), scale_inv


@current_cast.register_fake
def _(x_hp, fp8_dtype, power_of_2, with_transpose):
    m, k = x_hp.shape
    q = x_hp.new_empty((m, k), dtype=fp8_dtype)
    q_t = x_hp.new_empty((k, m) if with_transpose else _NONE, dtype=fp8_dtype)
    return q, q_t, x_hp.new_empty((1,), dtype=torch.float32)


def _outer_major_scale(like: Tensor, rows: int, tiles: int) -> Tensor:
    """(rows, tiles) FP32 with strides (1, rows): the blockwise GEMM's scale layout."""
    return like.new_empty((tiles, rows), dtype=torch.float32).t()


@torch.library.custom_op("fp8train::quantize_1x128", mutates_args=())
def quantize_1x128(x_hp: Tensor, fp8_dtype: torch.dtype, power_of_2: bool) -> tuple[Tensor, Tensor]:
    """ops.quantize_1x128: (q [M, K], scale_inv [M, K/128] with strides (1, M))."""
    return ops.quantize_1x128(x_hp, fp8_dtype, power_of_2)


@quantize_1x128.register_fake
def _(x_hp, fp8_dtype, power_of_2):
    m, k = x_hp.shape
    return x_hp.new_empty((m, k), dtype=fp8_dtype), _outer_major_scale(x_hp, m, k // BLOCK)


@torch.library.custom_op("fp8train::quantize_1x128_t", mutates_args=())
def quantize_1x128_t(x_hp: Tensor, fp8_dtype: torch.dtype, power_of_2: bool) -> tuple[Tensor, Tensor]:
    """ops.quantize_1x128_t: 1x128 tiles of x^T, from x."""
    return ops.quantize_1x128_t(x_hp, fp8_dtype, power_of_2)


@quantize_1x128_t.register_fake
def _(x_hp, fp8_dtype, power_of_2):
    m, k = x_hp.shape
    return x_hp.new_empty((k, m), dtype=fp8_dtype), _outer_major_scale(x_hp, k, m // BLOCK)


@torch.library.custom_op("fp8train::quantize_1x128_both", mutates_args=())
def quantize_1x128_both(x_hp: Tensor, fp8_dtype: torch.dtype,
                        power_of_2: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """ops.quantize_1x128_both: both operands above from one read of x."""
    return ops.quantize_1x128_both(x_hp, fp8_dtype, power_of_2)


@quantize_1x128_both.register_fake
def _(x_hp, fp8_dtype, power_of_2):
    m, k = x_hp.shape
    return (x_hp.new_empty((m, k), dtype=fp8_dtype), _outer_major_scale(x_hp, m, k // BLOCK),
            x_hp.new_empty((k, m), dtype=fp8_dtype), _outer_major_scale(x_hp, k, m // BLOCK))


@torch.library.custom_op("fp8train::quantize_128x128", mutates_args=())
def quantize_128x128(w_hp: Tensor, fp8_dtype: torch.dtype, power_of_2: bool) -> tuple[Tensor, Tensor]:
    """ops.quantize_128x128: (q [N, K], scale_inv [N/128, K/128] contiguous)."""
    return ops.quantize_128x128(w_hp, fp8_dtype, power_of_2)


@quantize_128x128.register_fake
def _(w_hp, fp8_dtype, power_of_2):
    n, k = w_hp.shape
    return w_hp.new_empty((n, k), dtype=fp8_dtype), w_hp.new_empty((n // BLOCK, k // BLOCK), dtype=torch.float32)


@torch.library.custom_op("fp8train::quantize_128x128_both", mutates_args=())
def quantize_128x128_both(w_hp: Tensor, fp8_dtype: torch.dtype,
                          power_of_2: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """ops.quantize_128x128_both: (q [N, K], scale_inv [N/128, K/128], q_t [K, N],
    scale_inv_t [K/128, N/128]), all contiguous."""
    return ops.quantize_128x128_both(w_hp, fp8_dtype, power_of_2)


@quantize_128x128_both.register_fake
def _(w_hp, fp8_dtype, power_of_2):
    n, k = w_hp.shape
    blocks, blocks_t = (n // BLOCK, k // BLOCK), (k // BLOCK, n // BLOCK)
    return (w_hp.new_empty((n, k), dtype=fp8_dtype), w_hp.new_empty(blocks, dtype=torch.float32),
            w_hp.new_empty((k, n), dtype=fp8_dtype), w_hp.new_empty(blocks_t, dtype=torch.float32))


@torch.library.custom_op("fp8train::gather_rows", mutates_args=())
def gather_rows(data: Tensor, index: Tensor | None, cols: int, col_rows: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """ops.gather_rows: (data[index] [T, K] or [0], token-major copy [K, cols] or [0])."""
    return ops.gather_rows(data, index, cols, col_rows)


@gather_rows.register_fake
def _(data, index, cols, col_rows=None):
    rows = data.new_empty(_NONE if index is None else (index.shape[0], data.shape[1]))
    return rows, data.new_empty((data.shape[1], cols) if cols else _NONE)


@torch.library.custom_op("fp8train::combine_rows", mutates_args=())
def combine_rows(y: Tensor, weight: Tensor, pos: Tensor) -> Tensor:
    """ops.combine_rows: the MoE combine as a gather, out [N, D]."""
    return ops.combine_rows(y, weight, pos)


@combine_rows.register_fake
def _(y, weight, pos):
    return y.new_empty((weight.shape[0], y.shape[1]))


@torch.library.custom_op("fp8train::combine_rows_backward", mutates_args=())
def combine_rows_backward(grad_out: Tensor, y: Tensor, weight: Tensor, pos: Tensor) -> tuple[Tensor, Tensor]:
    """ops.combine_rows_backward: (grad_y [M, D], grad_weight [N * k] FP32)."""
    return ops.combine_rows_backward(grad_out, y, weight, pos)


@combine_rows_backward.register_fake
def _(grad_out, y, weight, pos):
    return torch.empty_like(y), y.new_empty((weight.numel(),), dtype=torch.float32)


@torch.library.custom_op("fp8train::sum_rows_by_token", mutates_args=())
def sum_rows_by_token(grad_rows: Tensor, token_index: Tensor, num_tokens: int) -> Tensor:
    """ops.sum_rows_by_token: the backward of x[token_index], [num_tokens, D]."""
    return ops.sum_rows_by_token(grad_rows, token_index, num_tokens)


@sum_rows_by_token.register_fake
def _(grad_rows, token_index, num_tokens):
    return grad_rows.new_empty((num_tokens, grad_rows.shape[1]))


# ---------------------------------------------------------------- grouped FP8 GEMMs (MoE experts)
# kernels.grouped_gemm_ops as operators: the group offsets stay a device tensor, so a compiled MoE
# block has no graph break and no host sync around its expert GEMMs.
from kernels import grouped_gemm_ops  # noqa: E402


@torch.library.custom_op("fp8train::grouped_mm_experts_tensorwise", mutates_args=())
def grouped_mm_experts_tensorwise(a: Tensor, b: Tensor, a_scale_inv: Tensor, b_scale_inv: Tensor, offs: Tensor,
                                  out_dtype: torch.dtype, use_fast_accum: bool) -> Tensor:
    """grouped_gemm_ops.grouped_mm_experts_tensorwise: out [T, N]."""
    return grouped_gemm_ops.grouped_mm_experts_tensorwise(a, b, a_scale_inv, b_scale_inv, offs, out_dtype,
                                                          use_fast_accum)


@grouped_mm_experts_tensorwise.register_fake
def _(a, b, a_scale_inv, b_scale_inv, offs, out_dtype, use_fast_accum):
    return a.new_empty((a.shape[0], b.shape[1]), dtype=out_dtype)


@torch.library.custom_op("fp8train::grouped_mm_experts_blockwise", mutates_args=())
def grouped_mm_experts_blockwise(a: Tensor, b: Tensor, a_scale_inv: Tensor, b_scale_inv: Tensor, offs: Tensor,
                                 out_dtype: torch.dtype) -> Tensor:
    """grouped_gemm_ops.grouped_mm_experts_blockwise: out [T, N]."""
    return grouped_gemm_ops.grouped_mm_experts_blockwise(a, b, a_scale_inv, b_scale_inv, offs, out_dtype)


@grouped_mm_experts_blockwise.register_fake
def _(a, b, a_scale_inv, b_scale_inv, offs, out_dtype):
    return a.new_empty((a.shape[0], b.shape[1]), dtype=out_dtype)


@torch.library.custom_op("fp8train::grouped_mm_tokens_tensorwise", mutates_args=())
def grouped_mm_tokens_tensorwise(a: Tensor, b: Tensor, a_scale_inv: Tensor, b_scale_inv: Tensor, offs: Tensor,
                                 out_dtype: torch.dtype, use_fast_accum: bool, groups_aligned: bool) -> Tensor:
    """grouped_gemm_ops.grouped_mm_tokens_tensorwise: out [E, M, N]."""
    return grouped_gemm_ops.grouped_mm_tokens_tensorwise(a, b, a_scale_inv, b_scale_inv, offs, out_dtype,
                                                         use_fast_accum, groups_aligned)


@grouped_mm_tokens_tensorwise.register_fake
def _(a, b, a_scale_inv, b_scale_inv, offs, out_dtype, use_fast_accum, groups_aligned):
    return a.new_empty((offs.shape[0], a.shape[0], b.shape[0]), dtype=out_dtype)


@torch.library.custom_op("fp8train::grouped_mm_tokens_blockwise", mutates_args=())
def grouped_mm_tokens_blockwise(a: Tensor, b: Tensor, a_scale_inv: Tensor, b_scale_inv: Tensor, offs: Tensor,
                                out_dtype: torch.dtype) -> Tensor:
    """grouped_gemm_ops.grouped_mm_tokens_blockwise: out [E, M, N]."""
    return grouped_gemm_ops.grouped_mm_tokens_blockwise(a, b, a_scale_inv, b_scale_inv, offs, out_dtype)


@grouped_mm_tokens_blockwise.register_fake
def _(a, b, a_scale_inv, b_scale_inv, offs, out_dtype):
    return a.new_empty((offs.shape[0], a.shape[0], b.shape[0]), dtype=out_dtype)
