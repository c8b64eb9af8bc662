"""Public entry points: validate once, then run Triton or the torch fallback (`kernel_backend`).

Every function here has the signature and the exact results of its namesake in
`kernels.fallback` (the core's reference quantizers in the kernels' layouts); `kernels._backend` documents when Triton runs. The Triton modules are
imported on first use, so importing `kernels` never requires Triton.
"""

from __future__ import annotations

import torch

from kernels import fallback
from kernels._backend import kernel_backend


def _triton_mode(x: torch.Tensor) -> bool | None:
    """None: use the fallback; else the `soft` flag of the Triton kernels."""
    name, _ = kernel_backend(x)
    if name == "reference" or x.numel() == 0:
        return None
    return name == "triton-soft"


def _fused_transpose_ok(x_hp: torch.Tensor, soft: bool) -> bool:
    """The compiled sm_90 kernel's transposed store wrote wrong bytes for FP32 inputs on the H100
    (Triton 3.6; tests/kernels caught it, 16-bit inputs are exact). Until that is understood, FP32
    inputs get their FP8 transpose from a separate 1-byte copy (1 B read + 1 B written per element)."""
    return soft or x_hp.dtype != torch.float32


def cast_with_amax(x_hp: torch.Tensor, scale: torch.Tensor, fp8_dtype: torch.dtype,
                   with_transpose: bool = False):
    """Delayed-scaling cast fused with amax: (x_fp8 [M,K], x_fp8_t [K,M] or None, amax fp32 [1])."""
    return _delayed_tensorwise("cast_with_amax", x_hp, scale, fp8_dtype, with_transpose)


def cast_with_amax_tiles(x_hp: torch.Tensor, scale: torch.Tensor, fp8_dtype: torch.dtype,
                         with_transpose: bool = False):
    """`cast_with_amax` with the amax left as int32 bits per tile [fallback.amax_tile_count]
    (max of them = the amax, NaN above all): no zero-filled buffer, no atomics."""
    return _delayed_tensorwise("cast_with_amax_tiles", x_hp, scale, fp8_dtype, with_transpose)


def _delayed_tensorwise(name: str, x_hp, scale, fp8_dtype, with_transpose):
    """`name` of kernels.tensorwise (fallback off Triton): (x_fp8, x_fp8_t or None, its amax output)."""
    fallback.check_input(x_hp)
    fallback.check_scale(scale, x_hp)
    fallback.fp8_max(fp8_dtype)
    soft = _triton_mode(x_hp)
    if soft is None:
        return getattr(fallback, name)(x_hp, scale, fp8_dtype, with_transpose)
    from kernels import tensorwise

    fused_t = with_transpose and _fused_transpose_ok(x_hp, soft)
    q, q_t, amax = getattr(tensorwise, name)(x_hp, scale.reshape(1), fp8_dtype, fused_t, soft)
    return q, (q.t().contiguous() if with_transpose and not fused_t else q_t), amax


def delayed_cast(x_hp: torch.Tensor, scale: torch.Tensor, amax_slot: torch.Tensor | None,
                 fp8_dtype: torch.dtype, with_transpose: bool = False):
    """Delayed cast with the amax max-accumulated into `amax_slot` (history[0:1]) in the same
    launch: (x_fp8, x_fp8_t or None, scale_inv fp32 [1]). `amax_slot=None` records nothing."""
    fallback.check_input(x_hp)
    fallback.check_scale(scale, x_hp)
    fallback.fp8_max(fp8_dtype)
    if amax_slot is not None:
        fallback.check_amax_slot(amax_slot, x_hp)
    soft = _triton_mode(x_hp)
    if soft is None:
        return fallback.delayed_cast(x_hp, scale, amax_slot, fp8_dtype, with_transpose)
    from kernels import tensorwise

    fused_t = with_transpose and _fused_transpose_ok(x_hp, soft)
    q, q_t, scale_inv = tensorwise.delayed_cast(x_hp, scale.reshape(1), amax_slot, fp8_dtype, fused_t, soft)
    return q, (q.t().contiguous() if with_transpose and not fused_t else q_t), scale_inv


def current_cast(x_hp: torch.Tensor, fp8_dtype: torch.dtype, power_of_2: bool = False,
                 with_transpose: bool = False):
    """Current tensorwise scaling: (x_fp8, x_fp8_t or None, scale_inv fp32 [1])."""
    fallback.check_input(x_hp)
    fallback.fp8_max(fp8_dtype)
    soft = _triton_mode(x_hp)
    if soft is None:
        return fallback.current_cast(x_hp, fp8_dtype, power_of_2, with_transpose)
    from kernels import tensorwise

    fused_t = with_transpose and _fused_transpose_ok(x_hp, soft)
    q, q_t, scale_inv = tensorwise.current_cast(x_hp, fp8_dtype, power_of_2, fused_t, soft)
    return q, (q.t().contiguous() if with_transpose and not fused_t else q_t), scale_inv


def _check_blockwise(x_hp, fp8_dtype, op: str, m_tiled: bool, k_tiled: bool, name="x_hp"):
    fallback.check_input(x_hp, name)
    fallback.fp8_max(fp8_dtype)
    if m_tiled:
        fallback.check_multiple_of_block(x_hp, 0, "N" if name == "w_hp" else "M", op)
    if k_tiled:
        fallback.check_multiple_of_block(x_hp, 1, "K", op)


def _blockwise(op: str, x_hp: torch.Tensor, fp8_dtype: torch.dtype, power_of_2: bool,
               m_tiled: bool, k_tiled: bool, name: str = "x_hp"):
    """Validate, then run `op` from kernels.blockwise (Triton) or kernels.fallback."""
    _check_blockwise(x_hp, fp8_dtype, op, m_tiled=m_tiled, k_tiled=k_tiled, name=name)
    soft = _triton_mode(x_hp)
    if soft is None:
        return getattr(fallback, op)(x_hp, fp8_dtype, power_of_2)
    from kernels import blockwise

    return getattr(blockwise, op)(x_hp, fp8_dtype, power_of_2, soft)


def quantize_1x128(x_hp: torch.Tensor, fp8_dtype: torch.dtype, power_of_2: bool = False):
    """1x128 tiles along K: (q [M,K], scale_inv [M, K/128] with strides (1, M))."""
    return _blockwise("quantize_1x128", x_hp, fp8_dtype, power_of_2, m_tiled=False, k_tiled=True)


def quantize_1x128_t(x_hp: torch.Tensor, fp8_dtype: torch.dtype, power_of_2: bool = False):
    """1x128 tiles of x^T from x: (q_t [K,M], scale_inv [K, M/128] with strides (1, K))."""
    return _blockwise("quantize_1x128_t", x_hp, fp8_dtype, power_of_2, m_tiled=True, k_tiled=False)


def quantize_1x128_both(x_hp: torch.Tensor, fp8_dtype: torch.dtype, power_of_2: bool = False):
    """Both from one read of x: (q, scale_inv, q_t, scale_inv_t), layouts as above."""
    return _blockwise("quantize_1x128_both", x_hp, fp8_dtype, power_of_2, m_tiled=True, k_tiled=True)


def quantize_128x128(w_hp: torch.Tensor, fp8_dtype: torch.dtype, power_of_2: bool = False):
    """128x128 blocks: (q [N,K], scale_inv [N/128, K/128] contiguous)."""
    return _blockwise("quantize_128x128", w_hp, fp8_dtype, power_of_2, m_tiled=True, k_tiled=True, name="w_hp")


def quantize_128x128_both(w_hp: torch.Tensor, fp8_dtype: torch.dtype, power_of_2: bool = False):
    """W and W^T from one read: (q [N,K], scale_inv [N/128, K/128], q_t [K,N], scale_inv_t
    [K/128, N/128]), all contiguous."""
    return _blockwise("quantize_128x128_both", w_hp, fp8_dtype, power_of_2, m_tiled=True, k_tiled=True,
                      name="w_hp")


def delayed_scaling_update(amax_history: torch.Tensor, scale: torch.Tensor, scale_inv: torch.Tensor,
                           fmax: torch.Tensor, margin: float = 0.0, algo: str = "max") -> None:
    """Transformer Engine DelayedScaling update of L tensors, in place, in one launch."""
    fallback.check_delayed_args(amax_history, scale, scale_inv, fmax, algo)
    if _triton_mode(amax_history) is None:
        return fallback.delayed_scaling_update(amax_history, scale, scale_inv, fmax, margin, algo)
    from kernels import delayed

    delayed.delayed_scaling_update(amax_history, scale, scale_inv, fmax, margin, algo)


def gather_rows(data: torch.Tensor, index: torch.Tensor | None, cols: int = 0, col_rows: torch.Tensor | None = None):
    """MoE dispatch of FP8 codes: (data[index] [T, K], its token-major copy [K, cols]; an empty [0]
    tensor for what was not asked: index None / cols == 0), one launch for both (kernels/permute.py:
    col_rows places the rows on the columns of the padded expert layout, zeros elsewhere)."""
    fallback.check_gather_rows(data, index, cols, col_rows)
    if _triton_mode(data) is None:
        return fallback.gather_rows(data, index, cols, col_rows)
    from kernels import permute

    return permute.gather_rows(data, index, cols, col_rows)


def combine_rows(y: torch.Tensor, weight: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """MoE combine as a gather (kernels/moe_combine.py): out [N, D], out[n] = sum_j weight[n, j] *
    y[pos[n * k + j]] summed in FP32; pos -1 marks a dropped assignment."""
    fallback.check_combine(y, weight, pos)
    if _triton_mode(y) is None:
        return fallback.combine_rows(y, weight, pos)
    from kernels import moe_combine

    return moe_combine.combine_rows(y, weight, pos)


def combine_rows_backward(grad_out: torch.Tensor, y: torch.Tensor, weight: torch.Tensor,
                          pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_y [M, D], grad_weight [N * k] FP32) of combine_rows; grad_out [N, D] row-major."""
    fallback.check_combine(y, weight, pos)
    if grad_out.shape != (weight.shape[0], y.shape[1]) or grad_out.stride(1) != 1:
        raise ValueError(f"grad_out must be row-major [{weight.shape[0]}, {y.shape[1]}], got "
                         f"{tuple(grad_out.shape)} with strides {grad_out.stride()}")
    if _triton_mode(y) is None:
        return fallback.combine_rows_backward(grad_out, y, weight, pos)
    from kernels import moe_combine

    return moe_combine.combine_rows_backward(grad_out, y, weight, pos)


def sum_rows_by_token(grad_rows: torch.Tensor, token_index: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """The backward of the MoE dispatch gather x[token_index]: grad_x [num_tokens, D], each token's rows
    summed in FP32 by one gather launch (kernels/moe_combine.py) instead of an accumulating scatter."""
    if grad_rows.dim() != 2 or grad_rows.stride(1) != 1 or token_index.dim() != 1:
        raise ValueError(f"sum_rows_by_token takes row-major grad_rows [T, D] and token_index [T], got "
                         f"{tuple(grad_rows.shape)} (strides {grad_rows.stride()}) and {tuple(token_index.shape)}")
    if token_index.shape[0] != grad_rows.shape[0] or token_index.dtype != torch.int64:
        raise ValueError(f"token_index must be int64 [{grad_rows.shape[0]}], got {token_index.dtype} "
                         f"{tuple(token_index.shape)}")
    if _triton_mode(grad_rows) is None:
        return fallback.sum_rows_by_token(grad_rows, token_index, num_tokens)
    from kernels import moe_combine

    return moe_combine.sum_rows_by_token(grad_rows, token_index, num_tokens)
