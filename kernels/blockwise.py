"""Blockwise FP8 quantization in Triton (DeepSeek-V3 fine-grained scaling).

Scales come from the current amax of each group (no history), so one pass suffices: a program
loads its tile once, reduces the amax of every group inside it, and writes FP8 bytes and scales.

* `_quantize_1x128_kernel`, 1x128 tiles along K (activations, grad_output of the forward and
  dgrad GEMMs): a program holds BLOCK_M rows x 128 columns; the row max gives one scale per row.
* the same kernel with COLS: 1x128 tiles of x^T, i.e. 128x1 tiles of x (the wgrad operand, whose
  inner GEMM dimension is tokens): a program holds 128 rows x BLOCK_K columns, the column max gives
  one scale per column, and the tile is stored transposed (`tl.trans`, staged in shared memory)
  into q_t [K, M]. x^T is never materialised in high precision.
* ROWS and COLS together (`quantize_1x128_both`): a 128x128 tile yields both operands from ONE read.
* `_quantize_128x128_kernel` (weights): one scale per 128x128 block, a program per block.

Traffic per element for bf16 input: 2 B read + 1 B written + 4/128 B of scale = ~3.03 B for each
of 1x128, 1x128_t and 128x128; `both` reads once and writes twice: ~4.06 B instead of ~6.06 B for
two separate calls.

Scale layouts are GEMM-ready: 1x128 scale_inv is (M, K/128) with strides (1, M) (the kernel writes
row kt of a (K/128, M) buffer, which keeps its stores contiguous along M); 128x128 scale_inv is
(N/128, K/128) contiguous.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.fp8_triton import abs_bits, bits_to_float, quantize, reciprocal, scale_from_amax
from kernels.reference import BLOCK, fp8_max

# Launch configurations (benchmarks/tune_quant_kernels.py sweeps them on the GPU and prints the
# bandwidth of each; the values here are its pick on the H100). "rows": BLOCK_M of the 1x128
# launch (BLOCK_K is the tile, 128); "cols": BLOCK_K of the 1x128_t launch (BLOCK_M is 128);
# "both" is one 128x128 tile per program.
# H100 picks (benchmarks/results/h100_session3/tune_quant.txt): 1x128_t went from 0.76-0.81 of
# copy bandwidth (32 columns) to 0.87-0.93 (64 columns, 4 warps).
TILES = {"rows": {"block": 32, "num_warps": 4}, "cols": {"block": 64, "num_warps": 4},
         "both": {"num_warps": 8}, "block128": {"num_warps": 8}}


@triton.jit
def _quantize_1x128_kernel(x_ptr, q_ptr, qt_ptr, sinv_ptr, sinv_t_ptr, M, K,
                           FMAX: tl.constexpr, IS_E5M2: tl.constexpr, SOFT: tl.constexpr,
                           POW2: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """ROWS needs BLOCK_K == 128 (one tile per row); COLS needs BLOCK_M == 128 (per column)."""
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
def _quantize_128x128_kernel(w_ptr, q_ptr, sinv_ptr, K,
                             FMAX: tl.constexpr, IS_E5M2: tl.constexpr, SOFT: tl.constexpr,
                             POW2: tl.constexpr, BLOCK: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK + tl.arange(0, BLOCK)
    offs_k = pid_k * BLOCK + tl.arange(0, BLOCK)
    offs = offs_n.to(tl.int64)[:, None] * K + offs_k[None, :]
    w = tl.load(w_ptr + offs)
    amax_bits = tl.max(tl.max(abs_bits(w), axis=1, keep_dims=True), axis=0, keep_dims=True)  # [1, 1]
    scale = scale_from_amax(bits_to_float(amax_bits), FMAX, POW2)
    tl.store(q_ptr + offs, quantize(w, scale, FMAX, IS_E5M2, SOFT))
    sinv_offs = pid_n * tl.num_programs(1) + pid_k + tl.zeros([1, 1], dtype=tl.int32)
    tl.store(sinv_ptr + sinv_offs, reciprocal(scale))


def _fp8_meta(fp8_dtype: torch.dtype, soft: bool, power_of_2: bool) -> dict:
    return dict(FMAX=fp8_max(fp8_dtype), IS_E5M2=fp8_dtype == torch.float8_e5m2, SOFT=soft,
                POW2=power_of_2)


def _launch_1x128(x_hp, fp8_dtype, power_of_2, soft, rows: bool, cols: bool):
    """Allocate the requested outputs and run one launch; returns (q, sinv, q_t, sinv_t)."""
    M, K = x_hp.shape
    dev = x_hp.device
    q = torch.empty((M, K), dtype=fp8_dtype, device=dev) if rows else None
    sinv = torch.empty((K // BLOCK, M), dtype=torch.float32, device=dev) if rows else None
    q_t = torch.empty((K, M), dtype=fp8_dtype, device=dev) if cols else None
    sinv_t = torch.empty((M // BLOCK, K), dtype=torch.float32, device=dev) if cols else None
    config = TILES["both" if rows and cols else "rows" if rows else "cols"]
    block_m = BLOCK if cols else config["block"]
    block_k = BLOCK if rows else config["block"]
    q_u8 = (q if rows else q_t).view(torch.uint8)
    qt_u8 = (q_t if cols else q).view(torch.uint8)
    grid = (triton.cdiv(M, block_m), triton.cdiv(K, block_k))
    _quantize_1x128_kernel[grid](
        x_hp, q_u8, qt_u8, sinv if rows else sinv_t, sinv_t if cols else sinv, M, K,
        ROWS=rows, COLS=cols, BLOCK_M=block_m, BLOCK_K=block_k,
        num_warps=config["num_warps"], **_fp8_meta(fp8_dtype, soft, power_of_2),
    )
    # (K/128, M) contiguous -> (M, K/128) with strides (1, M); likewise for the transposed operand
    return q, None if sinv is None else sinv.t(), q_t, None if sinv_t is None else sinv_t.t()


def quantize_1x128(x_hp, fp8_dtype, power_of_2, soft):
    q, sinv, _, _ = _launch_1x128(x_hp, fp8_dtype, power_of_2, soft, rows=True, cols=False)
    return q, sinv


def quantize_1x128_t(x_hp, fp8_dtype, power_of_2, soft):
    _, _, q_t, sinv_t = _launch_1x128(x_hp, fp8_dtype, power_of_2, soft, rows=False, cols=True)
    return q_t, sinv_t


def quantize_1x128_both(x_hp, fp8_dtype, power_of_2, soft):
    return _launch_1x128(x_hp, fp8_dtype, power_of_2, soft, rows=True, cols=True)


def quantize_128x128(w_hp, fp8_dtype, power_of_2, soft):
    N, K = w_hp.shape
    q = torch.empty((N, K), dtype=fp8_dtype, device=w_hp.device)
    sinv = torch.empty((N // BLOCK, K // BLOCK), dtype=torch.float32, device=w_hp.device)
    grid = (N // BLOCK, K // BLOCK)
    _quantize_128x128_kernel[grid](w_hp, q.view(torch.uint8), sinv, K, BLOCK=BLOCK, num_warps=TILES["block128"]["num_warps"],
                                   **_fp8_meta(fp8_dtype, soft, power_of_2))
    return q, sinv
