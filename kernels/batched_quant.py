"""Batched weight quantization: one launch quantizes every weight of a model (PTQ's round-to-nearest
pass, or re-quantizing after an update), with the core's integer rules bit for bit.

The weights may all have different shapes. The launcher writes three small tables to the device:
the tensors' addresses (input, codes, scales, zero points), their shapes, and a work list with one
entry per (tensor, block of BLOCK_R rows). Program p reads entry p, turns the addresses into typed
pointers and quantizes its rows:

    TILE G (GROUP > 0)  for each group of G columns: grid and codes from that group alone
    ROW    (GROUP = 0)  pass 1: the row's amax (or min / max); pass 2: codes, BLOCK_G columns at a time

4-bit codes are packed two a byte (low nibble = even column); scales FP32 [N, K/G] (or [N, 1]),
zero points uint8, the layout of fp8train.quant's QuantizedTensor after `pack_4bit`.
"""

from __future__ import annotations

import triton
import triton.language as tl

from kernels.lowbit_triton import asym_codes, asym_grid, pack_pairs, sym_codes, sym_step, to_f32


@triton.jit
def _grid(x, lo_hi_src, QMAX: tl.constexpr, ASYM: tl.constexpr):
    """(step, zero) per row of x [R, C] (zero unused when symmetric)."""
    if ASYM:
        step, zero = asym_grid(tl.min(lo_hi_src, axis=1), tl.max(lo_hi_src, axis=1), QMAX)
    else:
        step = sym_step(tl.max(tl.abs(lo_hi_src), axis=1), QMAX)
        zero = step
    return step, zero


@triton.jit
def _store_codes(codes_ptr, x, step, zero, rows, cols0, row_len, mask_r, QMAX: tl.constexpr, ASYM: tl.constexpr,
                 BITS: tl.constexpr, BLOCK_R: tl.constexpr, WIDTH: tl.constexpr):
    """Codes of x [BLOCK_R, WIDTH] (columns cols0..) into a row-major code matrix of row_len columns."""
    if ASYM:
        codes = asym_codes(x, step[:, None], zero[:, None], QMAX)
    else:
        codes = sym_codes(x, step[:, None], QMAX)
    if BITS == 4:
        j = tl.arange(0, WIDTH // 2)
        ptrs = codes_ptr + rows[:, None] * (row_len // 2) + cols0 // 2 + j[None, :]
        tl.store(ptrs, pack_pairs(codes, BLOCK_R, WIDTH), mask=mask_r[:, None])
    else:
        c = tl.arange(0, WIDTH)
        tl.store(codes_ptr + rows[:, None] * row_len + cols0 + c[None, :], codes.to(codes_ptr.dtype.element_ty),
                 mask=mask_r[:, None])


@triton.jit
def batched_quantize_kernel(work_ptr, in_ptrs, codes_ptrs, scale_ptrs, zero_ptrs, shapes_ptr,
                            IN_DTYPE: tl.constexpr, CODE_DTYPE: tl.constexpr, BITS: tl.constexpr,
                            ASYM: tl.constexpr, GROUP: tl.constexpr, BLOCK_R: tl.constexpr,
                            BLOCK_G: tl.constexpr):
    p = tl.program_id(0)
    t = tl.load(work_ptr + 2 * p)
    r0 = tl.load(work_ptr + 2 * p + 1) * BLOCK_R
    x_ptr = tl.load(in_ptrs + t).to(tl.pointer_type(IN_DTYPE))
    codes_ptr = tl.load(codes_ptrs + t).to(tl.pointer_type(CODE_DTYPE))
    scale_ptr = tl.load(scale_ptrs + t).to(tl.pointer_type(tl.float32))
    zero_ptr = tl.load(zero_ptrs + t).to(tl.pointer_type(tl.uint8))
    n_rows = tl.load(shapes_ptr + 2 * t)
    k = tl.load(shapes_ptr + 2 * t + 1)
    QMAX: tl.constexpr = (15.0 if ASYM else 7.0) if BITS == 4 else (255.0 if ASYM else 127.0)
    rows = r0 + tl.arange(0, BLOCK_R)
    mask_r = rows < n_rows
    if GROUP > 0:
        c = tl.arange(0, GROUP)
        for g in range(0, k // GROUP):
            x = to_f32(tl.load(x_ptr + rows[:, None] * k + g * GROUP + c[None, :], mask=mask_r[:, None], other=0.0))
            step, zero = _grid(x, x, QMAX, ASYM)
            _store_codes(codes_ptr, x, step, zero, rows, g * GROUP, k, mask_r, QMAX, ASYM, BITS, BLOCK_R, GROUP)
            tl.store(scale_ptr + rows * (k // GROUP) + g, step, mask=mask_r)
            if ASYM:
                tl.store(zero_ptr + rows * (k // GROUP) + g, zero.to(tl.uint8), mask=mask_r)
    else:
        c = tl.arange(0, BLOCK_G)
        lo = tl.zeros((BLOCK_R,), tl.float32)
        hi = tl.zeros((BLOCK_R,), tl.float32)
        for k0 in range(0, k, BLOCK_G):
            x = to_f32(tl.load(x_ptr + rows[:, None] * k + k0 + c[None, :], mask=mask_r[:, None], other=0.0))
            lo = tl.minimum(lo, tl.min(x, axis=1))
            hi = tl.maximum(hi, tl.max(x, axis=1))
        if ASYM:
            step, zero = asym_grid(lo, hi, QMAX)
        else:
            step = sym_step(tl.maximum(-lo, hi), QMAX)
            zero = step
        tl.store(scale_ptr + rows, step, mask=mask_r)
        if ASYM:
            tl.store(zero_ptr + rows, zero.to(tl.uint8), mask=mask_r)
        for k0 in range(0, k, BLOCK_G):
            x = to_f32(tl.load(x_ptr + rows[:, None] * k + k0 + c[None, :], mask=mask_r[:, None], other=0.0))
            _store_codes(codes_ptr, x, step, zero, rows, k0, k, mask_r, QMAX, ASYM, BITS, BLOCK_R, BLOCK_G)
