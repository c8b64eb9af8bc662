"""Decode GEMV for weight-only int4 / int8: out[M, N] = x[M, K] @ W^T for M <= 16, built for HBM bandwidth.

Why a separate kernel. At M = 1 a linear layer does 2 FLOPs per weight and reads every weight once:
it is purely a memory stream. Bytes per output element = K * bits / 8 (codes) + K / G * 4 (FP32
scales) (+ K / G zeros). For 8B up (K = 4096, G = 128) that is 2048 + 128 + 32 = 2208 bytes per
output at 4 bits vs 8192 at BF16: the ideal speed-up is ~3.7x, and an H200 streams ~4.0-4.8 TB/s,
so the whole 4096 x 14336 int4 weight (31.6 MB incl. scales) takes ~7 us against ~25-29 us in BF16.
At M = 16 the same bytes feed 16x the multiply-adds: 16 * N * K FMAs = 0.94 G for 8B up, ~28 us
on the CUDA cores' ~34 T FMA/s, slower than BF16's tensor cores. Hence two inner loops:
  - FMA (CUDA cores), for small M: per K-tile and row m, sum_k code * x over each group;
  - DOT (tensor cores, BLOCK_M = 16), for M up to 16: the codes converted to x's dtype, tl.dot.
Which wins at which M is measured (benchmarks/bench_inference.py), not assumed.

Wide loads. The packed codes (fp8train.quant layout: 4-bit [N, K/2] uint8, low nibble = even k;
8-bit [N, K]) are read as int32 WORDS (a free view): word w of a row holds P = 32 / bits codes,
code j of word w (bits [j * bits, (j + 1) * bits)) is k = w * P + j (little-endian bytes, low
nibble first). A [BLOCK_N, BLOCK_K / P] tile of words is contiguous per row, so each thread gets
4 consecutive words = one 16-byte load (the row stride is specialized divisible by 16). Unpacking
is a shift, one mask-and-OR into the mantissa of 2^23 and one exact FP32 subtraction per code
(_field_f32): no byte loads, no interleave, no int -> float conversion instruction. x is loaded
as P strided slices x[k0 + w * P + j] (tiny, L1/L2-resident): scalar loads, one per slice and word
column a thread holds, shared by all its rows; taller tiles (more rows per thread) spend fewer of
them per code byte. (Loading x as one [WORDS, P] tile and unpacking the
codes into [BLOCK_N, WORDS, P] compiles to layout conversions through shared memory and twice the
registers on sm_90: checked with benchmarks/compile_inference_kernels.py, so not done.)

Per-group scaling. W[n, k] = (code - zero) * scale[n, k // G], so for one group g
    sum_k x * W = scale[n, g] * (sum_k code * x  -  zero[n, g] * sum_k x)
The FMA loop accumulates code * x elementwise over the P slices ([BLOCK_N, WORDS], no cross-thread
work), folds the words of each group (reshape [BLOCK_N, tile groups, words per group], sum), and
then applies zero and scale once per group; the per-group x sums are computed once per tile and row
and shared by all BLOCK_N outputs. Per-row scales (G = K) are applied once at the very end. A K-tile
may cover several groups (BLOCK_K = GROUPS_PER_TILE * G) so that one program has many bytes in
flight; the DOT loop takes one group per tile (BLOCK_K <= G).

Filling 132 SMs. The grid is (N / BLOCK_N, SPLIT_K, M tiles). With SPLIT_K > 1 each program
reduces a K-slice and the partial sums are combined WITHOUT counters or a last-arriver pass:
  SPLIT_MODE 1 (atomic): tl.atomic_add of FP32 partials into a zeroed FP32 [M, N], cast after;
  SPLIT_MODE 2 (reduce): each split stores its FP32 partial into ws[split], `splitk_sum_kernel`
                        sums over splits and casts (deterministic).
Both are launch candidates; the launcher (kernels/lowbit_gemv_ops.py) validates tiles.

Bytes in flight. STAGES = 1: plain 16-byte loads into registers, latency hidden by several programs
per SM (~80 registers a thread at M = 1: six 4-warp programs). STAGES > 1: Triton's software
pipeline (cp.async into shared memory, STAGES - 1 tiles ahead). Which hides HBM latency better is
measured (both are candidates); the compiled form can be checked without a GPU
(benchmarks/compile_inference_kernels.py prints registers per configuration).
"""

from __future__ import annotations

import triton
import triton.language as tl

from kernels.lowbit_gemm import _load_x
from kernels.lowbit_triton import code_f32, mma, store_as


@triton.jit
def _field_f32(words, J: tl.constexpr, WBITS: tl.constexpr, SIGNED: tl.constexpr):
    """Code J (bits [J * WBITS, (J + 1) * WBITS)) of each int32 word as its exact FP32 value, by the
    magic number of lowbit_triton.code_f32 (no I2F). The tensor-core path converts it on to x's
    dtype (exact: |code| <= 255)."""
    return code_f32((words >> (WBITS * J)) & ((1 << WBITS) - 1), WBITS, SIGNED)


@triton.jit
def _fma_tile(words, x_ptr, stride_xm, s_ptr, stride_sn, z_ptr, stride_zn, rm, rn, mask_n, M, K, k0,
              WBITS: tl.constexpr, ASYM: tl.constexpr, GROUP: tl.constexpr, PER_ROW: tl.constexpr,
              GPT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WORDS: tl.constexpr,
              SWIGLU: tl.constexpr):
    """CUDA cores: [BLOCK_M, BLOCK_N] partial of one K-tile, group scales (and zeros) applied."""
    P: tl.constexpr = 32 // WBITS
    w_idx = tl.arange(0, WORDS)
    row_ids = tl.arange(0, BLOCK_M)
    part = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    if not PER_ROW:
        g = k0 // GROUP + tl.arange(0, GPT)
        scale = tl.load(s_ptr + rn[:, None] * stride_sn + g[None, :], mask=mask_n[:, None], other=0.0)
        if ASYM:
            zero = tl.load(z_ptr + rn[:, None] * stride_zn + g[None, :], mask=mask_n[:, None], other=0).to(tl.float32)
    for m in tl.static_range(BLOCK_M):
        row = rm + m  # scalar row index (rm: the tile's first row)
        row_vec = tl.zeros((1,), tl.int32) + row
        qx = tl.zeros((BLOCK_N, WORDS), tl.float32)
        xs = tl.zeros((1, WORDS), tl.float32)
        for j in tl.static_range(P):
            xj = _load_x(x_ptr, stride_xm, row_vec, k0 + w_idx * P + j, row_vec < M, K, SWIGLU).to(tl.float32)
            qx += _field_f32(words, j, WBITS, not ASYM) * xj
            if ASYM:
                xs += xj
        if PER_ROW:
            pm = tl.sum(qx, axis=1)
            if ASYM:
                pm -= tl.load(z_ptr + rn * stride_zn, mask=mask_n, other=0).to(tl.float32) * tl.sum(xs, axis=1)
        else:
            per_group = tl.sum(tl.reshape(qx, (BLOCK_N, GPT, WORDS // GPT)), axis=2)  # [BLOCK_N, GPT]
            if ASYM:
                x_group = tl.sum(tl.reshape(xs, (1, GPT, WORDS // GPT)), axis=2)  # [1, GPT]
                per_group -= zero * x_group
            pm = tl.sum(per_group * scale, axis=1)
        part += tl.where(row_ids[:, None] == m, pm[None, :], 0.0)
    return part


@triton.jit
def _dot_tile(words, x_ptr, stride_xm, s_ptr, stride_sn, z_ptr, stride_zn, rm, rn, mask_n, M, K, k0,
              WBITS: tl.constexpr, ASYM: tl.constexpr, GROUP: tl.constexpr, PER_ROW: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WORDS: tl.constexpr, SWIGLU: tl.constexpr):
    """Tensor cores: one tl.dot per code slot j over the words (K-order permuted identically for x
    and codes, so no interleave), then zero and scale once for the tile's single group."""
    P: tl.constexpr = 32 // WBITS
    w_idx = tl.arange(0, WORDS)
    rows = rm + tl.arange(0, BLOCK_M)
    part = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    xs = tl.zeros((BLOCK_M,), tl.float32)
    for j in tl.static_range(P):
        xj = _load_x(x_ptr, stride_xm, rows, k0 + w_idx * P + j, rows < M, K, SWIGLU)  # [BLOCK_M, WORDS]
        part = mma(xj, tl.trans(_field_f32(words, j, WBITS, not ASYM).to(xj.dtype)), part)  # exact: |code| <= 255
        if ASYM:
            xs += tl.sum(xj.to(tl.float32), axis=1)
    if PER_ROW:
        f = 0
    else:
        f = k0 // GROUP
    if ASYM:
        part -= xs[:, None] * tl.load(z_ptr + rn * stride_zn + f, mask=mask_n, other=0).to(tl.float32)[None, :]
    if not PER_ROW:
        part *= tl.load(s_ptr + rn * stride_sn + f, mask=mask_n, other=0.0)[None, :]
    return part


@triton.jit
def lowbit_gemv_kernel(x_ptr, stride_xm, w_ptr, stride_wn, s_ptr, stride_sn, z_ptr, stride_zn,
                       out_ptr, stride_om, M, N, K,
                       WBITS: tl.constexpr, ASYM: tl.constexpr, GROUP: tl.constexpr, PER_ROW: tl.constexpr,
                       GPT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       SPLIT_K: tl.constexpr, SPLIT_MODE: tl.constexpr, DOT: tl.constexpr, SWIGLU: tl.constexpr,
                       STAGES: tl.constexpr):
    """w_ptr: the codes as int32 words [N, K * WBITS / 32] (row stride stride_wn words). out_ptr:
    the output (SPLIT_K = 1), a zeroed FP32 [M, N] (SPLIT_MODE 1) or FP32 ws [SPLIT_K, M, N] (2)."""
    P: tl.constexpr = 32 // WBITS
    WORDS: tl.constexpr = BLOCK_K // P
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rm = tl.program_id(2) * BLOCK_M
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = rn < N
    k_per_split = K // SPLIT_K
    k_lo = pid_k * k_per_split
    w_rows = w_ptr + rn[:, None] * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in tl.range(k_lo, k_lo + k_per_split, BLOCK_K, num_stages=STAGES):
        kw = tl.multiple_of(k0 // P, WORDS)
        words = tl.load(w_rows + kw + tl.arange(0, WORDS)[None, :], mask=mask_n[:, None], other=0)
        if DOT:
            acc += _dot_tile(words, x_ptr, stride_xm, s_ptr, stride_sn, z_ptr, stride_zn, rm, rn, mask_n, M, K, k0,
                             WBITS, ASYM, GROUP, PER_ROW, BLOCK_M, BLOCK_N, WORDS, SWIGLU)
        else:
            acc += _fma_tile(words, x_ptr, stride_xm, s_ptr, stride_sn, z_ptr, stride_zn, rm, rn, mask_n, M, K, k0,
                             WBITS, ASYM, GROUP, PER_ROW, GPT, BLOCK_M, BLOCK_N, WORDS, SWIGLU)
    if PER_ROW:
        acc *= tl.load(s_ptr + rn * stride_sn, mask=mask_n, other=0.0)[None, :]
    rows = rm + tl.arange(0, BLOCK_M)
    mask = (rows < M)[:, None] & mask_n[None, :]
    if SPLIT_MODE == 0:
        store_as(out_ptr + rows[:, None] * stride_om + rn[None, :], acc, mask=mask)
    elif SPLIT_MODE == 1:
        tl.atomic_add(out_ptr + rows[:, None] * N + rn[None, :], acc, mask=mask)
    else:
        tl.store(out_ptr + pid_k * M * N + rows[:, None] * N + rn[None, :], acc, mask=mask)


@triton.jit
def splitk_sum_kernel(ws_ptr, out_ptr, MN, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr):
    """out[i] = sum_s ws[s, i] for the flat [M * N] output, stored in out's dtype."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.zeros((BLOCK,), tl.float32)
    for s in tl.static_range(SPLIT_K):
        acc += tl.load(ws_ptr + s * MN + offs, mask=mask, other=0.0)
    store_as(out_ptr + offs, acc, mask=mask)
