"""MoE dispatch of FP8 rows: gather the rows in expert order and write their transpose, one launch.

    rows, rows_t = gather_rows(data, index, cols, col_rows)
        data     [N, K] 1-byte (FP8 codes), index [T] int64 (or None: data already holds the T rows)
        rows     [T, K]     rows[t] = data[index[t]]  (index None: not written, an empty [0] comes back)
        rows_t   [K, cols]  the token-major copy (cols = 0: none), column c = rows[col_rows[c]],
                 zeros where col_rows[c] < 0. col_rows None: column c = row c for c < T, zeros for
                 T <= c < cols (the ragged layout, T padded at the end)

The tokens of an MoE layer are cast to FP8 once, before dispatch (fp8train/numerics/grouped_dispatch.py);
this moves the 1-byte codes instead of the 2-byte activations, and writes the token-major copy the
grad_weight GEMM reads from the same read. `col_rows` places every expert's tokens on its own
128-aligned columns (fp8train/numerics/grouped_layout.py, the padded layout), so the grad_weight GEMM
reads whole 128-token chunks through TMA; it must hold every row in [0, T) exactly once (else
unlisted rows are not written). Each program takes BT consecutive output positions (columns of
rows_t; rows t themselves without col_rows), loads their BT x BK source tile (BK contiguous bytes
per row: coalesced), stores it as rows and its transpose (BT contiguous bytes per column). Plain
byte moves: exact on any backend.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.launcher import cdiv

BT, BK = 64, 128  # positions x columns per program: 128-byte row segments, 64-byte column segments


@triton.jit
def _gather_rows_kernel(src_ptr, index_ptr, col_rows_ptr, rows_ptr, rows_t_ptr, T, K, COLS, src_stride,
                        GATHER: tl.constexpr, MAPPED: tl.constexpr, WITH_T: tl.constexpr,
                        BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_t = tl.program_id(0)
    pid_k = tl.program_id(1)
    p = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)  # output positions: columns of rows_t
    k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = k < K
    if MAPPED:
        row = tl.load(col_rows_ptr + p, mask=p < COLS, other=-1)
    else:
        row = tl.where(p < T, p, -1).to(tl.int64)
    real = row >= 0
    source = row
    if GATHER:
        source = tl.load(index_ptr + row, mask=real, other=0).to(tl.int64)
    tile = tl.load(src_ptr + source[:, None] * src_stride + k[None, :], mask=real[:, None] & k_ok[None, :],
                   other=0)
    if GATHER:
        tl.store(rows_ptr + row[:, None] * K + k[None, :], tile, mask=real[:, None] & k_ok[None, :])
    if WITH_T:  # padding positions load zeros (masked), so they are written as zeros
        tile_t = tl.trans(tile)
        tl.store(rows_t_ptr + k[:, None].to(tl.int64) * COLS + p[None, :], tile_t,
                 mask=k_ok[:, None] & (p < COLS)[None, :])


def gather_rows(data: torch.Tensor, index: torch.Tensor | None, cols: int = 0, col_rows: torch.Tensor | None = None):
    """(rows [T, K] or an empty [0] tensor when index is None, rows_t [K, cols] or an empty [0]
    tensor when cols == 0), same dtype as data (see the module docstring)."""
    t_rows, k = (data.shape[0] if index is None else index.shape[0]), data.shape[1]
    src = data.view(torch.uint8)
    rows = torch.empty((0,) if index is None else (t_rows, k), dtype=torch.uint8, device=data.device)
    rows_t = torch.empty((k, cols) if cols else (0,), dtype=torch.uint8, device=data.device)
    width = cols if col_rows is not None else max(t_rows if index is not None else 0, cols)
    if width and k:
        grid = (cdiv(width, BT), cdiv(k, BK))
        _gather_rows_kernel[grid](src, src if index is None else index, src if col_rows is None else col_rows, rows,
                                  rows_t, t_rows, k, cols, src.stride(0), GATHER=index is not None,
                                  MAPPED=col_rows is not None, WITH_T=cols > 0, BLOCK_T=BT, BLOCK_K=BK, num_warps=4)
    return rows.view(data.dtype), rows_t.view(data.dtype)
