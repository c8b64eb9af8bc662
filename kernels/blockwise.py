"""Blockwise FP8 quantization in Triton (DeepSeek-V3 fine-grained scaling).

Scales come from the current amax of each group (no history), so one pass suffices: a program
loads its tile once, reduces the amax of every group inside it, and writes FP8 bytes and scales.

* `_quantize_1x128_kernel`, 1x128 tiles along K (activations, grad_output of the forward and
  dgrad GEMMs): a program holds BLOCK_M rows x 128 columns; the row max gives one scale per row.
* the same kernel with COLS: 1x128 tiles of x^T, i.e. 128x1 tiles of x (the wgrad operand, whose
  inner GEMM dimension is tokens): a program holds 128 rows x BLOCK_K columns, the column max gives
  one scale per column, and the tile is stored transposed (`tl.trans`, staged in shared memory)
  into q_t [K, M]. x^T is never materialised in high precision.
* `_quantize_1x128_both_kernel` (`quantize_1x128_both`): both operands from ONE read of x. A
  program owns a 128x128 tile but works on it in [128, CHUNK] column chunks: pass 1 reduces the row
  amax over all chunks (one scale per row), pass 2 reloads each chunk (hot in L1/L2) and quantizes
  it twice, with the row scales into q and with its own column scales into q_t (transposed).
  The column operand is reloaded transposed instead of transposing the quantized chunk. H100, fraction of copy bandwidth: whole tile + tl.trans 0.48, chunked 0.55-0.62,
  transposed load 0.69-0.72 (0.51 ms for 16384x16384 bf16, faster than the two single-operand
  launches' 0.58 ms though short of their ~0.9 each).
* `_quantize_128x128_kernel` (weights): one scale per 128x128 block, a program per block. With
  WITH_T it also stores the block transposed into q_t [K, N] (and its scale into the transposed
  scale grid): a 128x128 block of W is a block of W^T with the same scale, so the grad_input
  operand costs one more 1-byte write instead of a separate, uncoalesced torch transpose.

Traffic per element for bf16 input: 2 B read + 1 B written + 4/128 B of scale = ~3.03 B for each
of 1x128, 1x128_t and 128x128; `both` reads once and writes twice: ~4.06 B instead of ~6.06 B for
two separate calls; the 128x128 `both` writes twice too: ~4.06 B.

Scale layouts are GEMM-ready: 1x128 scale_inv is (M, K/128) with strides (1, M) (the kernel writes
row kt of a (K/128, M) buffer, which keeps its stores contiguous along M); 128x128 scale_inv is
(N/128, K/128) contiguous, and that of q_t is its transpose, (K/128, N/128) contiguous.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.fp8_triton import INTERPRETED, abs_bits, bits_to_float, quantize, reciprocal, scale_from_amax
from kernels.launcher import LeanKernel, cdiv
from kernels.fallback import BLOCK, fp8_max

# Launch configurations (benchmarks/tune_quant_kernels.py sweeps them on the GPU and prints the
# bandwidth of each; the values here are its pick on the H100). "rows": BLOCK_M of the 1x128
# launch (BLOCK_K is the tile, 128); "cols": BLOCK_K of the 1x128_t launch (BLOCK_M is 128);
# "both": CHUNK columns per step of the 128x128 tile (32, 64 or 128); "block128": the 128x128
# weight launch; "block128_both": the same with the transposed store.
# H100 picks (benchmarks/results/h100_session3/*tune*.txt): 1x128_t went from 0.76-0.81 of copy
# bandwidth (32 columns) to 0.87-0.94 (64 columns, 4 warps); `both` from 0.48 (whole tile, one
# tl.trans) to 0.55-0.62 (chunked) and 0.69-0.72 with the transposed load of 128 columns.
TILES = {"rows": {"block": 32, "num_warps": 4}, "cols": {"block": 64, "num_warps": 4},
         "both": {"chunk": 128, "num_warps": 4}, "block128": {"num_warps": 8},
         "block128_both": {"num_warps": 8}}


@triton.jit
def _quantize_1x128_kernel(x_ptr, q_ptr, qt_ptr, sinv_ptr, sinv_t_ptr, M, K,
                           FMAX: tl.constexpr, IS_E5M2: tl.constexpr, SOFT: tl.constexpr,
                           POW2: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """ROWS needs BLOCK_K == 128 (one tile per row); COLS needs BLOCK_M == 128 (per column).
    The launchers set one of the two (both operands at once: `_quantize_1x128_both_kernel`)."""
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
    x = tl.load(x_ptr + offs_m.to(tl.int64)[:, None] * K + offs_k[None, :], mask=mask, other=0.0)
    if ROWS:
        scale = scale_from_amax(bits_to_float(tl.max(abs_bits(x), axis=1)), FMAX, POW2)  # [BLOCK_M]
        q = quantize(x, scale[:, None], FMAX, IS_E5M2, SOFT)
        tl.store(q_ptr + offs_m.to(tl.int64)[:, None] * K + offs_k[None, :], q, mask=mask)
        tl.store(sinv_ptr + pid_k * M + offs_m, reciprocal(scale), mask=offs_m < M)
    if COLS:
        scale_t = scale_from_amax(bits_to_float(tl.max(abs_bits(x), axis=0)), FMAX, POW2)  # [BLOCK_K]
        q_t = tl.trans(quantize(x, scale_t[None, :], FMAX, IS_E5M2, SOFT))  # [BLOCK_K, BLOCK_M]
        tl.store(qt_ptr + offs_k.to(tl.int64)[:, None] * M + offs_m[None, :], q_t, mask=tl.trans(mask))
        tl.store(sinv_t_ptr + pid_m * K + offs_k, reciprocal(scale_t), mask=offs_k < K)


@triton.jit
def _quantize_1x128_both_kernel(x_ptr, q_ptr, qt_ptr, sinv_ptr, sinv_t_ptr, M, K,
                                FMAX: tl.constexpr, IS_E5M2: tl.constexpr, SOFT: tl.constexpr,
                                POW2: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    """One 128x128 tile of x (M, K multiples of 128: no masks), CHUNK columns at a time.

    The column operand reloads the chunk transposed ([CHUNK, 128], element (j, i) = x[i, j]) and
    quantizes it row by row, so q_t is stored in its own orientation: the layout change happens on
    the load, not in a tl.trans of the quantized chunk (0.55-0.62 of copy bandwidth that way)."""
    offs_m = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tile_k = tl.program_id(1) * BLOCK
    row_offs = offs_m.to(tl.int64)[:, None] * K  # [128, 1]
    # pass 1: amax of every row over the tile's 128 columns -> the row scales
    amax_bits = tl.zeros([BLOCK], dtype=tl.int32)
    for c in tl.static_range(0, BLOCK, CHUNK):
        offs_k = tile_k + c + tl.arange(0, CHUNK)
        x = tl.load(x_ptr + row_offs + offs_k[None, :])  # [128, CHUNK]
        amax_bits = tl.maximum(amax_bits, tl.max(abs_bits(x), axis=1))
    scale = scale_from_amax(bits_to_float(amax_bits), FMAX, POW2)  # [128]
    tl.store(sinv_ptr + tl.program_id(1) * M + offs_m, reciprocal(scale))
    # pass 2: each chunk again, into q with the row scales and into q_t with its column scales
    for c in tl.static_range(0, BLOCK, CHUNK):
        offs_k = tile_k + c + tl.arange(0, CHUNK)
        x = tl.load(x_ptr + row_offs + offs_k[None, :])
        tl.store(q_ptr + row_offs + offs_k[None, :], quantize(x, scale[:, None], FMAX, IS_E5M2, SOFT))
        x_t = tl.load(x_ptr + offs_m.to(tl.int64)[None, :] * K + offs_k[:, None])  # [CHUNK, 128]
        scale_t = scale_from_amax(bits_to_float(tl.max(abs_bits(x_t), axis=1)), FMAX, POW2)  # [CHUNK]
        q_t = quantize(x_t, scale_t[:, None], FMAX, IS_E5M2, SOFT)
        tl.store(qt_ptr + offs_k.to(tl.int64)[:, None] * M + offs_m[None, :], q_t)
        tl.store(sinv_t_ptr + tl.program_id(0) * K + offs_k, reciprocal(scale_t))


@triton.jit
def _quantize_128x128_kernel(w_ptr, q_ptr, qt_ptr, sinv_ptr, sinv_t_ptr, N, K,
                             FMAX: tl.constexpr, IS_E5M2: tl.constexpr, SOFT: tl.constexpr,
                             POW2: tl.constexpr, WITH_T: tl.constexpr, BLOCK: tl.constexpr):
    """WITH_T also writes q_t [K, N] and the transposed scale grid [K/128, N/128]."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK + tl.arange(0, BLOCK)
    offs_k = pid_k * BLOCK + tl.arange(0, BLOCK)
    offs = offs_n.to(tl.int64)[:, None] * K + offs_k[None, :]
    w = tl.load(w_ptr + offs)
    amax_bits = tl.max(tl.max(abs_bits(w), axis=1, keep_dims=True), axis=0, keep_dims=True)  # [1, 1]
    scale = scale_from_amax(bits_to_float(amax_bits), FMAX, POW2)
    q = quantize(w, scale, FMAX, IS_E5M2, SOFT)
    sinv = reciprocal(scale)
    one = tl.zeros([1, 1], dtype=tl.int32)
    tl.store(q_ptr + offs, q)
    tl.store(sinv_ptr + pid_n * tl.num_programs(1) + pid_k + one, sinv)
    if WITH_T:  # the same bytes and scale, at the transposed places
        tl.store(qt_ptr + offs_k.to(tl.int64)[:, None] * N + offs_n[None, :], tl.trans(q))  # [k, n]
        tl.store(sinv_t_ptr + pid_k * tl.num_programs(0) + pid_n + one, sinv)


_TILES_LAUNCH = LeanKernel(_quantize_1x128_kernel, INTERPRETED)
_BOTH_LAUNCH = LeanKernel(_quantize_1x128_both_kernel, INTERPRETED)
_BLOCKS_LAUNCH = LeanKernel(_quantize_128x128_kernel, INTERPRETED)


def _fp8_meta(fp8_dtype: torch.dtype, soft: bool, power_of_2: bool) -> dict:
    return dict(FMAX=fp8_max(fp8_dtype), IS_E5M2=fp8_dtype == torch.float8_e5m2, SOFT=soft,
                POW2=power_of_2)


def _launch_1x128(x_hp, fp8_dtype, power_of_2, soft, cols: bool):
    """One operand, one launch of `_quantize_1x128_kernel`: (q, scale_inv) of x (ROWS) or of x^T
    (COLS). The kernel writes row t of a (tiles, rows) buffer, returned as (rows, tiles) with strides
    (1, rows): stores contiguous along the outer dimension, the layout the GEMM wants."""
    M, K = x_hp.shape
    rows_out, cols_out = (K, M) if cols else (M, K)
    q = torch.empty((rows_out, cols_out), dtype=fp8_dtype, device=x_hp.device)
    sinv = torch.empty((cols_out // BLOCK, rows_out), dtype=torch.float32, device=x_hp.device)
    config = TILES["cols" if cols else "rows"]
    block_m, block_k = (BLOCK, config["block"]) if cols else (config["block"], BLOCK)
    q_u8 = q.view(torch.uint8)
    grid = (cdiv(M, block_m), cdiv(K, block_k))
    _TILES_LAUNCH(grid, (x_hp, q_u8, q_u8, sinv, sinv, M, K),
                  {**_fp8_meta(fp8_dtype, soft, power_of_2), "ROWS": not cols, "COLS": cols,
                   "BLOCK_M": block_m, "BLOCK_K": block_k}, num_warps=config["num_warps"])
    return q, sinv.t()


def quantize_1x128(x_hp, fp8_dtype, power_of_2, soft):
    return _launch_1x128(x_hp, fp8_dtype, power_of_2, soft, cols=False)


def quantize_1x128_t(x_hp, fp8_dtype, power_of_2, soft):
    return _launch_1x128(x_hp, fp8_dtype, power_of_2, soft, cols=True)


def quantize_1x128_both(x_hp, fp8_dtype, power_of_2, soft):
    """(q, scale_inv, q_t, scale_inv_t) with the layouts of the two calls above (M, K % 128 == 0)."""
    M, K = x_hp.shape
    dev = x_hp.device
    q = torch.empty((M, K), dtype=fp8_dtype, device=dev)
    q_t = torch.empty((K, M), dtype=fp8_dtype, device=dev)
    sinv = torch.empty((K // BLOCK, M), dtype=torch.float32, device=dev)
    sinv_t = torch.empty((M // BLOCK, K), dtype=torch.float32, device=dev)
    config = TILES["both"]
    _BOTH_LAUNCH((M // BLOCK, K // BLOCK), (x_hp, q.view(torch.uint8), q_t.view(torch.uint8), sinv, sinv_t, M, K),
                 {**_fp8_meta(fp8_dtype, soft, power_of_2), "BLOCK": BLOCK, "CHUNK": config["chunk"]},
                 num_warps=config["num_warps"])
    return q, sinv.t(), q_t, sinv_t.t()


def _launch_128x128(w_hp, fp8_dtype, power_of_2, soft, with_t: bool):
    """(q [N,K], scale_inv [N/128,K/128], q_t [K,N] or None, scale_inv_t [K/128,N/128] or None)."""
    N, K = w_hp.shape
    dev = w_hp.device
    q = torch.empty((N, K), dtype=fp8_dtype, device=dev)
    sinv = torch.empty((N // BLOCK, K // BLOCK), dtype=torch.float32, device=dev)
    q_t = torch.empty((K, N), dtype=fp8_dtype, device=dev) if with_t else None
    sinv_t = torch.empty((K // BLOCK, N // BLOCK), dtype=torch.float32, device=dev) if with_t else None
    q_u8 = q.view(torch.uint8)
    config = TILES["block128_both" if with_t else "block128"]
    _BLOCKS_LAUNCH((N // BLOCK, K // BLOCK),
                   (w_hp, q_u8, q_t.view(torch.uint8) if with_t else q_u8, sinv, sinv_t if with_t else sinv, N, K),
                   {**_fp8_meta(fp8_dtype, soft, power_of_2), "WITH_T": with_t, "BLOCK": BLOCK},
                   num_warps=config["num_warps"])
    return q, sinv, q_t, sinv_t


def quantize_128x128(w_hp, fp8_dtype, power_of_2, soft):
    q, sinv, _, _ = _launch_128x128(w_hp, fp8_dtype, power_of_2, soft, with_t=False)
    return q, sinv


def quantize_128x128_both(w_hp, fp8_dtype, power_of_2, soft):
    return _launch_128x128(w_hp, fp8_dtype, power_of_2, soft, with_t=True)
