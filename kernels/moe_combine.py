"""MoE combine as a gather: every token reads its k expert rows once, sums them in FP32, one launch.

    out        = combine_rows(y, weight, pos)                       # forward
    grad_y, gw = combine_rows_backward(grad_out, y, weight, pos)    # backward
        y       [M, D]  expert outputs in dispatch (expert-sorted) order, any float dtype
        weight  [N, k]  routing weights (any float dtype; read as FP32)
        pos     [N * k] int64, the row of y that holds assignment n * k + j, -1 if it was dropped
        out     [N, D]  out[n] = sum_j weight[n, j] * y[pos[n * k + j]], FP32 sum, y's dtype
        grad_y  [M, D]  grad_y[pos[n * k + j]] = weight[n, j] * grad_out[n]  (y's dtype)
        gw      [N * k] FP32, gw[n * k + j] = sum_d grad_out[n, d] * y[pos[n * k + j], d]

Why. The scatter form (scale every expert row by its weight into an FP32 copy, then `index_add_`
into the tokens) moves the [M, D] rows three times in FP32 and adds with atomics; its backward adds
a gather, a multiply and a sum per row. On the 16384-token, d 7168, top-8 layer that was ~26 ms of a
74 ms block on an H200 (benchmarks/results/h200x4_session8/moe_large_call4), the same in the BF16
and FP8 blocks. As a gather each output element is written once, with no atomics: the forward reads
the M rows once (in y's dtype) and writes N rows; the backward reads grad_out and the M rows and
writes grad_y, and the weight gradients come out of the same read. Every row of y is some
assignment's row (dispatch sends each kept assignment to exactly one row), so grad_y is fully written.

One program per token; it walks D in BLOCK_D chunks and loads its k rows as one [KP, BLOCK_D] tile
(KP = k rounded up to a power of two, dropped and padding slots masked to zero). The sum over the k
slots runs in slot order (deterministic, unlike the atomics of `index_add_`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _slots(w_ptr, pos_ptr, n, K: tl.constexpr, KP: tl.constexpr):
    """(rows [KP] int64 with dead slots at 0, live [KP], weight [KP] FP32 with dead slots at 0)."""
    j = tl.arange(0, KP)
    rows = tl.load(pos_ptr + n * K + j, mask=j < K, other=-1)
    live = rows >= 0
    w = tl.load(w_ptr + n * K + j, mask=live, other=0.0).to(tl.float32)
    return tl.where(live, rows, 0).to(tl.int64), live, w


@triton.jit
def _combine_kernel(y_ptr, w_ptr, pos_ptr, out_ptr, D, stride_y, stride_out,
                    K: tl.constexpr, KP: tl.constexpr, BLOCK_D: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    rows, live, w = _slots(w_ptr, pos_ptr, n, K, KP)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        dm = d < D
        tile = tl.load(y_ptr + rows[:, None] * stride_y + d[None, :], mask=live[:, None] & dm[None, :], other=0.0)
        acc = tl.sum(tile.to(tl.float32) * w[:, None], axis=0)
        tl.store(out_ptr + n * stride_out + d, acc.to(out_ptr.dtype.element_ty), mask=dm)


@triton.jit
def _combine_backward_kernel(g_ptr, y_ptr, w_ptr, pos_ptr, gy_ptr, gw_ptr, D, stride_g, stride_y, stride_gy,
                             K: tl.constexpr, KP: tl.constexpr, BLOCK_D: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    rows, live, w = _slots(w_ptr, pos_ptr, n, K, KP)
    dots = tl.zeros((KP,), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        dm = d < D
        g = tl.load(g_ptr + n * stride_g + d, mask=dm, other=0.0).to(tl.float32)
        m2 = live[:, None] & dm[None, :]
        tile = tl.load(y_ptr + rows[:, None] * stride_y + d[None, :], mask=m2, other=0.0).to(tl.float32)
        dots += tl.sum(tile * g[None, :], axis=1)
        grad_rows = (w[:, None] * g[None, :]).to(gy_ptr.dtype.element_ty)
        tl.store(gy_ptr + rows[:, None] * stride_gy + d[None, :], grad_rows, mask=m2)
    j = tl.arange(0, KP)
    tl.store(gw_ptr + n * K + j, dots, mask=j < K)


def _block_d(d: int) -> int:
    return min(1024, triton.next_power_of_2(max(d, 16)))


def combine_rows(y: torch.Tensor, weight: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """out [N, D] (see the module docstring); inputs already checked by kernels.ops."""
    n, k = weight.shape
    out = torch.empty((n, y.shape[1]), dtype=y.dtype, device=y.device)
    if n:
        _combine_kernel[(n,)](y, weight, pos, out, y.shape[1], y.stride(0), out.stride(0), K=k,
                              KP=triton.next_power_of_2(k), BLOCK_D=_block_d(y.shape[1]), num_warps=4)
    return out


def combine_rows_backward(grad_out: torch.Tensor, y: torch.Tensor, weight: torch.Tensor,
                          pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_y [M, D] in y's dtype, grad_weight [N * k] FP32)."""
    n, k = weight.shape
    grad_y = torch.empty_like(y)
    grad_w = torch.empty(n * k, dtype=torch.float32, device=y.device)
    if n:
        _combine_backward_kernel[(n,)](grad_out, y, weight, pos, grad_y, grad_w, y.shape[1], grad_out.stride(0),
                                       y.stride(0), grad_y.stride(0), K=k, KP=triton.next_power_of_2(k),
                                       BLOCK_D=_block_d(y.shape[1]), num_warps=4)
    return grad_y, grad_w


@triton.jit
def _sum_rows_kernel(g_ptr, rows_ptr, starts_ptr, counts_ptr, out_ptr, D, stride_g, stride_out,
                     BLOCK_D: tl.constexpr):
    """out[n] = sum of g[rows[starts[n] + i]] for i < counts[n], in FP32 (one program per token)."""
    n = tl.program_id(0).to(tl.int64)
    start = tl.load(starts_ptr + n)
    count = tl.load(counts_ptr + n)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        dm = d < D
        acc = tl.zeros((BLOCK_D,), tl.float32)
        for i in range(0, count):
            row = tl.load(rows_ptr + start + i)
            acc += tl.load(g_ptr + row * stride_g + d, mask=dm, other=0.0).to(tl.float32)
        tl.store(out_ptr + n * stride_out + d, acc.to(out_ptr.dtype.element_ty), mask=dm)


def sum_rows_by_token(grad_rows: torch.Tensor, token_index: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """grad_x [num_tokens, D]: grad_x[n] = sum of grad_rows[r] over the rows r with token_index[r] == n
    (the backward of x[token_index]), FP32 sum, grad_rows' dtype. The rows of each token are found
    by a stable sort of token_index (CSR: counts, starts), so any number of rows per token works
    (drop-free routing: k each; a capacity limit: 0..k)."""
    width = grad_rows.shape[1]
    out = torch.empty((num_tokens, width), dtype=grad_rows.dtype, device=grad_rows.device)
    if num_tokens:
        counts = torch.zeros(num_tokens, dtype=torch.int64, device=grad_rows.device).scatter_add_(
            0, token_index, torch.ones_like(token_index))
        starts = torch.cumsum(counts, 0) - counts
        rows = torch.argsort(token_index, stable=True)
        _sum_rows_kernel[(num_tokens,)](grad_rows, rows, starts, counts, out, width, grad_rows.stride(0),
                                        out.stride(0), BLOCK_D=_block_d(width), num_warps=4)
    return out
