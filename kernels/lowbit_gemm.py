"""Weight-only low-bit GEMM: out[M, N] = x[M, K] @ W^T with W in 4 or 8 bits, dequantized in-kernel.

Weight layout (fp8train.quant): codes [N, K] (4-bit: packed [N, K/2] uint8, low nibble = even k),
decode step `scale` [N, K/G] FP32 (G = K: one per output row), integer `zero` [N, K/G] for
asymmetric grids; W[n, k] = (code - zero) * scale.

The dequantization is arranged so that no weight is ever rounded: codes (and code - zero) are
small integers, exact in bf16, so the tensor cores multiply x by the CODES and the FP32 partial sum
of one K-step (inside one group, BLOCK_K <= G) is scaled afterwards:

    part[m, n] = sum_k x[m, k] * code[n, k]                 tensor-core dot, FP32 accumulate
    asym:  part -= zero[n, g] * sum_k x[m, k]               (x . (code - zero) without a per-element subtract)
    acc  += part * scale[n, g]                              once per K-step, not per element
    (PER_ROW, G = K: acc = sum of parts, times scale[n] at the end)

4-bit codes are unpacked into their even and odd halves. INTERLEAVE puts them back in K order in
registers (tl.interleave) so x is loaded contiguously and one dot covers the K-step; without it
the halves are multiplied with x's even and odd columns (two dots over stride-2 loads of x). Which
is faster is measured per shape (benchmarks/bench_inference.py), not assumed. BLOCK_M = 1 (M = 1, a GEMV) multiplies
on the CUDA cores instead of padding one row to a 16-row tensor-core tile. Per element the kernel does a shift or
mask and one int -> bf16 conversion. `SWIGLU` makes the input silu(x[:, :K]) * x[:, K:] (the gate /
up halves of a fused gate_up output), computed on the fly: the down projection of an MLP then
needs no separate activation kernel.

TRANS computes out^T tiles, codes . x^T: the weights are then the tensor-core product's left
operand, which Hopper's wgmma can take straight from registers (where they were dequantized)
instead of through shared memory; the large-M tiles spill far fewer registers this way.

UNROLL > 1 handles that many K-steps per loop iteration as straight-line code, so their weight
loads are all in flight together (a memory-bound GEMV needs many bytes in flight per SM).

Split-K (SPLIT_K > 1) spreads K over several programs (small M, narrow N: more programs in flight
for a memory-bound GEMV). Each adds its FP32 tile into a zeroed workspace with atomics and counts
in on a per-tile counter; the last one to arrive reads the sum (atomically, from L2), writes the
output and resets workspace and counter, so one launch does everything and the workspace is zero
again for the next call (CUDA-graph safe; one stream at a time per workspace).
"""

from __future__ import annotations

import triton
import triton.language as tl

from kernels.lowbit_triton import code_f32, int_to, mma, store_as, to_f32, unpack_pairs


@triton.jit
def _load_x(x_ptr, stride_xm, rows, cols, mask_m, K, SWIGLU: tl.constexpr):
    """x[rows, cols] in x's dtype; with SWIGLU, silu(gate) * up from the two halves of x."""
    if SWIGLU:
        gate = to_f32(tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=mask_m[:, None], other=0.0))
        up = to_f32(tl.load(x_ptr + rows[:, None] * stride_xm + K + cols[None, :], mask=mask_m[:, None], other=0.0))
        out = (gate / (1.0 + tl.exp(-gate)) * up).to(x_ptr.dtype.element_ty)
    else:
        out = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=mask_m[:, None], other=0.0)
    return out


@triton.jit
def _dot(x, codes, part, BLOCK_M: tl.constexpr, TRANS: tl.constexpr):
    """part + x [BLOCK_M, BK] . codes [BN, BK]^T ([BN, BLOCK_M] = codes . x^T when TRANS).
    BLOCK_M = 1 (a GEMV): FP32 multiply-adds on the CUDA cores and a row sum, no tensor-core tile
    padded from 1 row to 16; else the tensor cores."""
    if BLOCK_M == 1:
        prod = codes.to(tl.float32) * x.to(tl.float32)  # [BN, BK] * [1, BK]
        out = part + tl.reshape(tl.sum(prod, axis=1), (1, codes.shape[0]))
    elif TRANS:
        out = mma(int_to(codes, x.dtype), tl.trans(x), part)
    else:
        out = mma(x, tl.trans(int_to(codes, x.dtype)), part)
    return out


@triton.jit
def _cols(v, TRANS: tl.constexpr):
    """A per-output-column vector [BN] broadcast against a tile ([BM, BN], or [BN, BM] if TRANS)."""
    if TRANS:
        out = v[:, None]
    else:
        out = v[None, :]
    return out


@triton.jit
def _rows(v, TRANS: tl.constexpr):
    """A per-row (token) vector [BM] broadcast against a tile."""
    if TRANS:
        out = v[None, :]
    else:
        out = v[:, None]
    return out


@triton.jit
def _nibble_pair_f32(packed, SIGNED: tl.constexpr):
    """Packed bytes -> (even, odd) codes as exact FP32 by the 2^23 magic number (lowbit_triton.code_f32):
    no int -> float conversion instruction before the codes reach the tensor cores or the FMAs."""
    even, odd = unpack_pairs(packed, False)
    return code_f32(even, 4, SIGNED), code_f32(odd, 4, SIGNED)


@triton.jit
def _kstep(x_ptr, stride_xm, w_ptr, stride_wn, z_ptr, stride_zn, rm, rn, mask_m, mask_n, k0, K,
           WBITS: tl.constexpr, ASYM: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr,
           BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SWIGLU: tl.constexpr, TRANS: tl.constexpr,
           INTERLEAVE: tl.constexpr):
    """FP32 partial x[:, k0:k0+BLOCK_K] . (code - zero)[:, k0:k0+BLOCK_K]^T, [BLOCK_M, BLOCK_N]
    (transposed if TRANS)."""
    if TRANS:
        part = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
    else:
        part = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    if WBITS == 4 and INTERLEAVE:
        j = tl.arange(0, BLOCK_K // 2)
        packed = tl.load(w_ptr + rn[:, None] * stride_wn + k0 // 2 + j[None, :], mask=mask_n[:, None], other=0)
        even, odd = _nibble_pair_f32(packed, not ASYM)
        kk = k0 + tl.arange(0, BLOCK_K)
        xt = _load_x(x_ptr, stride_xm, rm, kk, mask_m, K, SWIGLU)
        part = _dot(xt, tl.interleave(even, odd), part, BLOCK_M, TRANS)
        if ASYM:
            x_sum = tl.sum(xt.to(tl.float32), axis=1)
    elif WBITS == 4:
        j = tl.arange(0, BLOCK_K // 2)
        packed = tl.load(w_ptr + rn[:, None] * stride_wn + k0 // 2 + j[None, :], mask=mask_n[:, None], other=0)
        even, odd = _nibble_pair_f32(packed, not ASYM)
        x_even = _load_x(x_ptr, stride_xm, rm, k0 + 2 * j, mask_m, K, SWIGLU)
        x_odd = _load_x(x_ptr, stride_xm, rm, k0 + 2 * j + 1, mask_m, K, SWIGLU)
        part = _dot(x_even, even, part, BLOCK_M, TRANS)
        part = _dot(x_odd, odd, part, BLOCK_M, TRANS)
        if ASYM:
            x_sum = tl.sum(x_even.to(tl.float32), axis=1) + tl.sum(x_odd.to(tl.float32), axis=1)
    else:
        kk = k0 + tl.arange(0, BLOCK_K)
        codes = tl.load(w_ptr + rn[:, None] * stride_wn + kk[None, :], mask=mask_n[:, None], other=0)
        xt = _load_x(x_ptr, stride_xm, rm, kk, mask_m, K, SWIGLU)
        part = _dot(xt, codes, part, BLOCK_M, TRANS)
        if ASYM:
            x_sum = tl.sum(xt.to(tl.float32), axis=1)
    if ASYM:
        zero = tl.load(z_ptr + rn * stride_zn + k0 // GROUP, mask=mask_n, other=0).to(tl.float32)
        part -= _rows(x_sum, TRANS) * _cols(zero, TRANS)
    return part


@triton.jit
def lowbit_matmul_kernel(x_ptr, stride_xm, w_ptr, stride_wn, s_ptr, stride_sn, z_ptr, stride_zn,
                         out_ptr, stride_om, ws_ptr, cnt_ptr, M, N, K,
                         WBITS: tl.constexpr, ASYM: tl.constexpr, GROUP: tl.constexpr, PER_ROW: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         SPLIT_K: tl.constexpr, UNROLL: tl.constexpr, SWIGLU: tl.constexpr,
                         TRANS: tl.constexpr, INTERLEAVE: tl.constexpr):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    n_tiles = tl.cdiv(N, BLOCK_N)
    pid_m = pid // n_tiles
    pid_n = pid % n_tiles
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = rm < M
    mask_n = rn < N
    k_per_split = K // SPLIT_K
    k_lo = pid_k * k_per_split
    if TRANS:
        acc = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k_outer in range(k_lo, k_lo + k_per_split, BLOCK_K * UNROLL):
        for u in tl.static_range(UNROLL):  # straight-line code: all UNROLL tiles' loads in flight at once
            k0 = k_outer + u * BLOCK_K
            part = _kstep(x_ptr, stride_xm, w_ptr, stride_wn, z_ptr, stride_zn, rm, rn, mask_m, mask_n, k0, K,
                          WBITS, ASYM, GROUP, BLOCK_M, BLOCK_N, BLOCK_K, SWIGLU, TRANS, INTERLEAVE)
            if not PER_ROW:
                scale = tl.load(s_ptr + rn * stride_sn + k0 // GROUP, mask=mask_n, other=0.0)
                acc += part * _cols(scale, TRANS)
            else:
                acc += part
    if PER_ROW:
        acc = acc * _cols(tl.load(s_ptr + rn * stride_sn, mask=mask_n, other=0.0), TRANS)
    mask = _rows(mask_m, TRANS) & _cols(mask_n, TRANS)
    out_ptrs = out_ptr + _rows(rm, TRANS) * stride_om + _cols(rn, TRANS)
    if SPLIT_K == 1:
        store_as(out_ptrs, acc, mask=mask)
    else:
        ws = ws_ptr + _rows(rm, TRANS) * N + _cols(rn, TRANS)
        tl.atomic_add(ws, acc, mask=mask)
        tl.debug_barrier()
        arrived = tl.atomic_add(cnt_ptr + pid, 1)
        if arrived == SPLIT_K - 1:  # the last split of this tile: sum, store, reset
            total = tl.atomic_add(ws, tl.zeros_like(acc), mask=mask)
            store_as(out_ptrs, total, mask=mask)
            tl.store(ws, tl.zeros_like(acc), mask=mask)
            tl.atomic_xchg(cnt_ptr + pid, 0)


@triton.jit
def dequantize_kernel(w_ptr, stride_wn, s_ptr, stride_sn, z_ptr, stride_zn, out_ptr, N, K,
                      WBITS: tl.constexpr, ASYM: tl.constexpr, GROUP: tl.constexpr, PER_ROW: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[N, K] = (code - zero) * scale in out's dtype (the large-M path: dequantize, then cuBLAS)."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    mask_n = rn < N
    if PER_ROW:
        f = 0
    else:
        f = k0 // GROUP
    scale = tl.load(s_ptr + rn * stride_sn + f, mask=mask_n, other=0.0)[:, None]
    if WBITS == 4:
        j = tl.arange(0, BLOCK_K // 2)
        packed = tl.load(w_ptr + rn[:, None] * stride_wn + k0 // 2 + j[None, :], mask=mask_n[:, None], other=0)
        even, odd = _nibble_pair_f32(packed, not ASYM)
        codes = tl.interleave(even, odd)  # K order again: one contiguous store per row
        if ASYM:
            codes -= tl.load(z_ptr + rn * stride_zn + f, mask=mask_n, other=0).to(tl.float32)[:, None]
        kk = k0 + tl.arange(0, BLOCK_K)
        store_as(out_ptr + rn[:, None] * K + kk[None, :], codes * scale, mask=mask_n[:, None])
    else:
        kk = k0 + tl.arange(0, BLOCK_K)
        codes = tl.load(w_ptr + rn[:, None] * stride_wn + kk[None, :], mask=mask_n[:, None], other=0).to(tl.int32)
        if ASYM:
            codes -= tl.load(z_ptr + rn * stride_zn + f, mask=mask_n, other=0).to(tl.int32)[:, None]
        store_as(out_ptr + rn[:, None] * K + kk[None, :], codes.to(tl.float32) * scale, mask=mask_n[:, None])
