"""Fused KV-cache writes: (RoPE +) quantize + store in one launch, and KIVI's group flush.

`kv_write_kernel`, one program per (batch row b, KV head h, new token t):
    k, v rows [D] (optionally rotated by RoPE at position slot + t - start[b], together with the
    REP query heads that share the KV head, written to q_out) -> the layer's cache at slot
    `slot + t` (or slot (slot + t) % W in a KIVI window):
        MODE 0 bf16   store bf16
        MODE 1 fp8    E4M3, one scale per row: scale = 448 / amax, stored 1 / scale
        MODE 2 int8   symmetric, one step per row
        MODE 3 int4   symmetric, one step per GROUP channels, packed (ROTATE_K, int4_hadamard: the
                      key row is first rotated by R = H diag(s) / sqrt(D), after RoPE)
        MODE 4 kivi   bf16 into the window (quantization happens in the flush)
        MODE 5 int4_centered   keys: k - mu (CENTER: mu = the row's prompt mean key [D], FP32), then
                      rotated like int4_hadamard; keys and values uint4 asymmetric, one (step,
                      zero) per GROUP channels, packed. A padded slot (slot < start[b]) stores
                      zeros, as the reference does.
    SINK > 0 (any per-token mode): the token at row position p = slot + t - start[b] < SINK is also
    stored in BF16 into sink_k, sink_v [B, H, SINK, D], the key as the codes see it (centered,
    rotated): the attention reads those slots from there.
`kivi_flush_kernel`, one program per (b, h, group): keys per channel over G tokens and values per
token in groups of G channels, asymmetric UINT4, packed. Decode (DYNAMIC): the group that just
left the newest-R window, if one did at this step, read from the window; prefill: group
program_id(1) read from the input.

The layouts and rules are fp8train/inference/kv_reference.py's; the codes match it bit for bit.
"""

from __future__ import annotations

import triton
import triton.language as tl

from kernels.fp8_triton import quantize as fp8_quantize
from kernels.fp8_triton import reciprocal, scale_from_amax
from kernels.lowbit_triton import (asym_codes, asym_grid, hadamard_row, pack_pairs, store_as, sym_codes, sym_step,
                                  to_f32)

MODE_BF16, MODE_FP8, MODE_INT8, MODE_INT4, MODE_KIVI = 0, 1, 2, 3, 4


@triton.jit
def _rotate(row_ptr, cos_row, sin_row, offs, D: tl.constexpr):
    """FP32 rotate-half RoPE of a row [D]: out[d] = x[d] cos - x[d + D/2] sin (first half),
    x[d] cos + x[d - D/2] sin (second half)."""
    half = D // 2
    x = to_f32(tl.load(row_ptr + offs))
    partner = to_f32(tl.load(row_ptr + (offs + half) % D))
    c = tl.load(cos_row + offs % half)
    s = tl.load(sin_row + offs % half)
    return tl.where(offs < half, x * c - partner * s, x * c + partner * s)


@triton.jit
def _store_row(x, codes_ptr, scale_ptr, zero_ptr, offs, MODE: tl.constexpr, D: tl.constexpr,
               GROUP: tl.constexpr, SOFT: tl.constexpr):
    """Quantize one FP32 row [D] per MODE and store its codes (and decode factors)."""
    if MODE == 0 or MODE == 4:
        store_as(codes_ptr + offs, x)
    elif MODE == 1:
        scale = scale_from_amax(tl.max(tl.abs(x), axis=0), 448.0, False)
        tl.store(codes_ptr + offs, fp8_quantize(x, scale, 448.0, False, SOFT))
        tl.store(scale_ptr, reciprocal(scale))
    elif MODE == 2:
        step = sym_step(tl.max(tl.abs(x), axis=0), 127.0)
        tl.store(codes_ptr + offs, sym_codes(x, step, 127.0).to(tl.int8))
        tl.store(scale_ptr, step)
    elif MODE == 3:
        groups = tl.reshape(x, (D // GROUP, GROUP))
        step = sym_step(tl.max(tl.abs(groups), axis=1), 7.0)  # [D / GROUP]
        codes = tl.reshape(sym_codes(groups, step[:, None], 7.0), (1, D))
        packed = tl.reshape(pack_pairs(codes, 1, D), (D // 2,))
        tl.store(codes_ptr + tl.arange(0, D // 2), packed)
        tl.store(scale_ptr + tl.arange(0, D // GROUP), step)
    else:  # MODE 5: uint4 asymmetric per GROUP channels
        groups = tl.reshape(x, (D // GROUP, GROUP))
        step, zero = asym_grid(tl.min(groups, axis=1), tl.max(groups, axis=1), 15.0)  # [D / GROUP]
        codes = tl.reshape(asym_codes(groups, step[:, None], zero[:, None], 15.0), (1, D))
        tl.store(codes_ptr + tl.arange(0, D // 2), tl.reshape(pack_pairs(codes, 1, D), (D // 2,)))
        tl.store(scale_ptr + tl.arange(0, D // GROUP), step)
        tl.store(zero_ptr + tl.arange(0, D // GROUP), zero.to(tl.uint8))


@triton.jit
def kv_write_kernel(k_ptr, v_ptr, stride_b, stride_h, stride_t, kc_ptr, ks_ptr, kz_ptr, vc_ptr, vs_ptr, vz_ptr,
                    slot_ptr, H, S, RING,
                    q_ptr, q_stride_b, q_stride_h, qo_ptr, cos_ptr, sin_ptr, start_ptr, signs_ptr, inv_sqrt,
                    mu_ptr, sink_k_ptr, sink_v_ptr,
                    MODE: tl.constexpr, D: tl.constexpr, GROUP: tl.constexpr, ROPE: tl.constexpr,
                    REP: tl.constexpr, SOFT: tl.constexpr, ROTATE_K: tl.constexpr, LOG2_D: tl.constexpr,
                    CENTER: tl.constexpr, SINK: tl.constexpr):
    bh = tl.program_id(0)
    t = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs = tl.arange(0, D)
    slot = tl.load(slot_ptr) + t
    src = b * stride_b + h * stride_h + t * stride_t
    if ROPE:
        pos = tl.maximum(slot - tl.load(start_ptr + b), 0)
        cos_row = cos_ptr + pos * (D // 2)
        sin_row = sin_ptr + pos * (D // 2)
        k = _rotate(k_ptr + src, cos_row, sin_row, offs, D)
        for r in tl.static_range(REP):
            qh = h * REP + r
            q = _rotate(q_ptr + b * q_stride_b + qh * q_stride_h, cos_row, sin_row, offs, D)
            store_as(qo_ptr + (b * H * REP + qh) * D + offs, q)
    else:
        k = to_f32(tl.load(k_ptr + src + offs))
    v = to_f32(tl.load(v_ptr + src + offs))
    if CENTER:  # padded slots (before the row's start) store zeros, as the reference does
        k = tl.where(slot >= tl.load(start_ptr + b), k - tl.load(mu_ptr + (b * H + h) * D + offs), 0.0)
    if ROTATE_K:
        k = hadamard_row(k, tl.load(signs_ptr + offs), inv_sqrt, D, LOG2_D)
    if SINK > 0:
        p = slot - tl.load(start_ptr + b)
        in_sink = tl.where((p >= 0) & (p < SINK), offs >= 0, offs < 0)  # full-shape (interpreter) mask
        sink_row = ((b * H + h) * SINK + tl.minimum(tl.maximum(p, 0), SINK - 1)) * D
        store_as(sink_k_ptr + sink_row + offs, k, mask=in_sink)
        store_as(sink_v_ptr + sink_row + offs, v, mask=in_sink)
    if RING > 0:
        slot = slot % RING
        rows = RING
    else:
        rows = S
    row = (b * H + h) * rows + slot
    DC: tl.constexpr = D // 2 if MODE == 3 or MODE == 5 else D
    F: tl.constexpr = D // GROUP if MODE == 3 or MODE == 5 else 1
    _store_row(k, kc_ptr + row * DC, ks_ptr + row * F, kz_ptr + row * F, offs, MODE, D, GROUP, SOFT)
    _store_row(v, vc_ptr + row * DC, vs_ptr + row * F, vz_ptr + row * F, offs, MODE, D, GROUP, SOFT)


@triton.jit
def kivi_flush_kernel(src_k, src_v, src_stride_b, src_stride_h, src_stride_t,
                      kc_ptr, ks_ptr, kz_ptr, vc_ptr, vs_ptr, vz_ptr, slot_ptr, H, S, RING, RESIDUAL,
                      D: tl.constexpr, G: tl.constexpr, DYNAMIC: tl.constexpr):
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    if DYNAMIC:  # decode: the group that left the window at this step, if any
        m = tl.load(slot_ptr) + 1 - RESIDUAL
        valid = (m >= G) & (m % G == 0)
        group = tl.where(valid, m // G - 1, 0)
    else:
        group = tl.program_id(1).to(tl.int64)
        valid = group >= 0
    tok = tl.arange(0, G)
    offs = tl.arange(0, D)
    pos = group * G + tok  # [G]
    row_ok = tl.where(valid, tok >= 0, tok < 0)  # full-shape masks (the interpreter rejects
    chan_ok = tl.where(valid, offs >= 0, offs < 0)  # a scalar & a tensor as a mask)
    src_row = pos % RING if DYNAMIC else pos
    src = b * src_stride_b + h * src_stride_h + src_row[:, None] * src_stride_t + offs[None, :]
    k = to_f32(tl.load(src_k + src))  # [G, D]
    v = to_f32(tl.load(src_v + src))
    # keys: per channel over the G tokens
    k_step, k_zero = asym_grid(tl.min(k, axis=0), tl.max(k, axis=0), 15.0)  # [D]
    k_codes = asym_codes(k, k_step[None, :], k_zero[None, :], 15.0)
    token_rows = (b * H + h) * S + pos  # [G]
    half = tl.arange(0, D // 2)
    tl.store(kc_ptr + token_rows[:, None] * (D // 2) + half[None, :], pack_pairs(k_codes, G, D), mask=row_ok[:, None])
    group_row = (b * H + h) * (S // G) + group
    tl.store(ks_ptr + group_row * D + offs, k_step, mask=chan_ok)
    tl.store(kz_ptr + group_row * D + offs, k_zero.to(tl.uint8), mask=chan_ok)
    # values: per token, groups of G channels
    vg = tl.reshape(v, (G, D // G, G))
    v_step, v_zero = asym_grid(tl.min(vg, axis=2), tl.max(vg, axis=2), 15.0)  # [G, D / G]
    v_codes = tl.reshape(asym_codes(vg, v_step[:, :, None], v_zero[:, :, None], 15.0), (G, D))
    tl.store(vc_ptr + token_rows[:, None] * (D // 2) + half[None, :], pack_pairs(v_codes, G, D), mask=row_ok[:, None])
    fo = tl.arange(0, D // G)
    factor = token_rows[:, None] * (D // G) + fo[None, :]
    tl.store(vs_ptr + factor, v_step, mask=row_ok[:, None])
    tl.store(vz_ptr + factor, v_zero.to(tl.uint8), mask=row_ok[:, None])
