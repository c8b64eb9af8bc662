"""W8A8: per-token activation quantization (INT8 or E4M3) and an INT8 tensor-core GEMM.

`quantize_rows_kernel`, one program per row of x [M, K] (CURRENT scaling, the core's rules):
    int8   step = amax / 127 (0 -> 1), codes = clamp(rne(x / step), -127, 127), stores the step
    e4m3   scale = 448 / amax (0, inf, NaN -> 1), codes = sat(x * scale) -> E4M3, stores 1 / scale
Two passes over the row (amax, then codes); the second one reads it again from L2.

`int8_matmul_kernel`: out[M, N] = (xq[M, K] @ wq[N, K]^T) * sx[m] * sw[n], INT8 x INT8 -> INT32 on
the tensor cores (exact), the FP32 scaling fused into the epilogue (the alternative,
torch._int_mm, writes the INT32 product to memory and reads it back for the scaling: 8 bytes per
output element, a large share of the time at prefill sizes). FP8 W8A8 uses torch._scaled_mm with
row-wise scales, whose epilogue does the same (kernels/lowbit_ops.py).
"""

from __future__ import annotations

import triton
import triton.language as tl

from kernels.fp8_triton import quantize as fp8_quantize
from kernels.fp8_triton import reciprocal, scale_from_amax
from kernels.lowbit_triton import store_as, sym_codes, sym_step, to_f32


@triton.jit
def quantize_rows_kernel(x_ptr, stride_xm, codes_ptr, scale_ptr, K, FP8: tl.constexpr,
                         BLOCK_K: tl.constexpr, SOFT: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK_K)
    amax = tl.zeros((BLOCK_K,), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = to_f32(tl.load(x_ptr + row * stride_xm + k0 + offs, mask=k0 + offs < K, other=0.0))
        amax = tl.maximum(amax, tl.abs(x))
    amax = tl.max(amax, axis=0)
    if FP8:
        scale = scale_from_amax(amax, 448.0, False)
        tl.store(scale_ptr + row, reciprocal(scale))
    else:
        step = sym_step(amax, 127.0)
        tl.store(scale_ptr + row, step)
    for k0 in range(0, K, BLOCK_K):
        mask = k0 + offs < K
        x = to_f32(tl.load(x_ptr + row * stride_xm + k0 + offs, mask=mask, other=0.0))
        if FP8:
            tl.store(codes_ptr + row * K + k0 + offs, fp8_quantize(x, scale, 448.0, False, SOFT), mask=mask)
        else:
            tl.store(codes_ptr + row * K + k0 + offs, sym_codes(x, step, 127.0).to(tl.int8), mask=mask)


@triton.jit
def int8_matmul_kernel(a_ptr, b_ptr, sa_ptr, sb_ptr, out_ptr, M, N, K,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       GROUP_M: tl.constexpr):
    """a [M, K], b [N, K] int8 row-major; sa [M], sb [N] FP32; out [M, N]."""
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n  # swizzle: GROUP_M row tiles share the weight tiles in L2
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.int32)
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(a_ptr + rm[:, None] * K + k0 + rk[None, :], mask=rm[:, None] < M, other=0)
        b = tl.load(b_ptr + rn[:, None] * K + k0 + rk[None, :], mask=rn[:, None] < N, other=0)
        acc = tl.dot(a, tl.trans(b), acc, out_dtype=tl.int32)
    sa = tl.load(sa_ptr + rm, mask=rm < M, other=0.0)
    sb = tl.load(sb_ptr + rn, mask=rn < N, other=0.0)
    out = acc.to(tl.float32) * sa[:, None] * sb[None, :]
    store_as(out_ptr + rm[:, None] * N + rn[None, :], out, mask=(rm[:, None] < M) & (rn[None, :] < N))
