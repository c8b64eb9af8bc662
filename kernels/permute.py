"""MoE dispatch of FP8 rows: gather the rows in expert order and write their transpose, one launch.

    rows, rows_t = gather_rows(data, index, cols)     data [N, K] (1-byte: FP8 codes), index [T] int64
        rows   [T, K]     rows[t] = data[index[t]]
        rows_t [K, cols]  rows_t[:, t] = rows[t] for t < T, zeros for T <= t < cols (cols >= T;
                          cols = 0: no transpose)

The tokens of an MoE layer are cast to FP8 once, before dispatch (fp8train/numerics/grouped_dispatch.py);
this moves the 1-byte codes instead of the 2-byte activations, and writes the token-major copy the
grad_weight GEMM reads ([K, T], T padded to a multiple of 16 for TMA) from the same read. Each
program loads a BT x BK tile of gathered rows (BK contiguous bytes per row: coalesced), stores it,
and stores its transpose (BT contiguous bytes per column). Plain byte moves: exact on any backend.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.launcher import cdiv

BT, BK = 64, 128  # tokens x columns per program: 128-byte row segments, 64-byte column segments


@triton.jit
def _gather_rows_kernel(src_ptr, index_ptr, rows_ptr, rows_t_ptr, T, K, COLS, src_stride,
                        WITH_T: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_t = tl.program_id(0)
    pid_k = tl.program_id(1)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    real = t < T
    k_ok = k < K
    source = tl.load(index_ptr + t, mask=real, other=0).to(tl.int64)
    tile = tl.load(src_ptr + source[:, None] * src_stride + k[None, :], mask=real[:, None] & k_ok[None, :],
                   other=0)
    tl.store(rows_ptr + t[:, None].to(tl.int64) * K + k[None, :], tile, mask=real[:, None] & k_ok[None, :])
    if WITH_T:  # rows past T are zeros (masked loads), written up to COLS
        tile_t = tl.trans(tile)
        tl.store(rows_t_ptr + k[:, None].to(tl.int64) * COLS + t[None, :], tile_t,
                 mask=k_ok[:, None] & (t < COLS)[None, :])


def gather_rows(data: torch.Tensor, index: torch.Tensor, cols: int = 0):
    """(rows [T, K], rows_t [K, cols] or an empty [0] tensor when cols == 0), same dtype as data."""
    t_rows, k = index.shape[0], data.shape[1]
    src = data.view(torch.uint8)
    rows = torch.empty(t_rows, k, dtype=torch.uint8, device=data.device)
    rows_t = torch.empty((k, cols) if cols else (0,), dtype=torch.uint8, device=data.device)
    width = max(t_rows, cols)
    if width and k:
        grid = (cdiv(width, BT), cdiv(k, BK))
        _gather_rows_kernel[grid](src, index, rows, rows_t, t_rows, k, cols, src.stride(0), WITH_T=cols > 0,
                                  BLOCK_T=BT, BLOCK_K=BK, num_warps=4)
    return rows.view(data.dtype), rows_t.view(data.dtype)
