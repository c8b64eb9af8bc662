"""Decode attention that reads a (quantized) KV cache directly: split over the context, then reduce.

One new query token per batch row. `kv_attention_kernel`, grid (B * H, SPLITS [+ 1 for KIVI]):
program (b, h, s) takes the REP query heads that share KV head h (a [BLOCK_H, D] block, padded to
16 rows for the tensor-core dot), walks its share of the slots in BLOCK_N tiles, dequantizes each
key / value tile in registers and runs the online softmax (FlashAttention-2 style, FP32 running max
m, sum l, accumulator acc), then writes (m, l, acc) of its share. `kv_attention_reduce_kernel`
merges the shares: out = sum_s exp(m_s - M) acc_s / sum_s exp(m_s - M) l_s.

How a tile is dequantized (x = (code - zero) * scale, the core's rule):
    bf16      as is
    fp8/int8  codes -> compute dtype (exact), the per-token scale multiplies the scores (keys) or
              the probabilities (values): no per-element multiply
    int4      even / odd nibbles as two [BLOCK_N, D/2] halves; q and acc are split the same way,
              so the dot products never interleave: q.k = q_even.k_even + q_odd.k_odd
    kivi      keys: per-channel step/zero per token group of KG: a tile is NG = BLOCK_N / TG groups
              of TG = min(BLOCK_N, KG) tokens, loaded as [NG, TG, D/2] bytes so each group's factor
              row broadcasts (one group per tile when KG >= BLOCK_N, several when KG < BLOCK_N);
              values like int4 with zeros; program s = SPLITS walks the BF16 window (positions
              Q(n)..n-1) instead
    int4_centered (MODE 5)   like int4 with zero points (uint4 asymmetric keys and values); the keys
              are stored centered and rotated, and the query arrives rotated, so nothing else changes
    SINK > 0  the first SINK slots of each row (start[b] ..) are read from the BF16 sink instead of
              their codes: program s = SPLITS walks the sink, the others start at start[b] + SINK

Tensor-core shapes: every tl.dot here is [BLOCK_H, K] x [K, N] with BLOCK_H >= 16 and N, K in
{BLOCK_N, D, D/2}; the launcher (kernels/kv_ops.py `check_kernel_sizes`) admits only powers of two
with BLOCK_N >= 16 and D (4-bit: D/2) >= 16, so no dot is below the 16 x 16 x 16 minimum. (KIVI used
to shrink BLOCK_N to KG, giving 8-wide dots and a K = 8 fallback that computed garbage on an H200.)

Slots below start[b] (left padding) and at or beyond n = slot + 1 are masked. The number of tokens
is read from device memory (`slot_ptr`), so the launch is CUDA-graph safe with a fixed grid.
"""

from __future__ import annotations

import triton
import triton.language as tl

from kernels.lowbit_triton import code_f32, fp8_to_f32, int_to, mma, store_as, unpack_pairs

NEG_INF = tl.constexpr(float("-inf"))


@triton.jit
def _tile_full(c_ptr, s_ptr, rows, offs_d, mask_n, MODE: tl.constexpr, D: tl.constexpr, DT: tl.constexpr):
    """8-bit / bf16 tile [BLOCK_N, D] in the compute dtype DT (exact) plus per-row scales [BLOCK_N]."""
    raw = tl.load(c_ptr + rows[:, None] * D + offs_d[None, :], mask=mask_n[:, None], other=0)
    if MODE == 1:
        codes = fp8_to_f32(raw).to(DT)
    elif MODE == 2:
        codes = int_to(raw, DT)
    else:
        codes = raw.to(DT)
    if MODE == 0 or MODE == 4:
        scale = tl.full(rows.shape, 1.0, tl.float32)
    else:
        scale = tl.load(s_ptr + rows, mask=mask_n, other=0.0)
    return codes, scale


@triton.jit
def _key_groups(c_ptr, s_ptr, z_ptr, t0, hi, row0, group0, D: tl.constexpr, KG: tl.constexpr,
                DT: tl.constexpr, BLOCK_N: tl.constexpr):
    """KIVI keys of slots t0 .. t0 + BLOCK_N - 1 -> dequantized (even, odd) halves [BLOCK_N, D/2].

    Factors are per channel per token group of KG: the tile is NG groups of TG tokens, codes are
    loaded [NG, TG, D/2] and group g's factor rows [D] (group index (t0 + g TG) / KG) broadcast over
    its TG tokens. t0 is a multiple of BLOCK_N and hi of TG, so a group-in-tile is all in or all out."""
    TG: tl.constexpr = BLOCK_N if BLOCK_N < KG else KG
    NG: tl.constexpr = BLOCK_N // TG
    g = tl.arange(0, NG)
    i = tl.arange(0, TG)
    j = tl.arange(0, D // 2)
    first = t0 + g * TG  # [NG] first slot of each group-in-tile
    ok = first < hi
    slots = first[:, None] + i[None, :]  # [NG, TG]
    packed = tl.load(c_ptr + (row0 + slots)[:, :, None] * (D // 2) + j[None, None, :],
                     mask=ok[:, None, None], other=0)
    even, odd = unpack_pairs(packed, False)  # [NG, TG, D/2]
    factor = (group0 + first // KG)[:, None] * D + 2 * j[None, :]  # [NG, D/2]: channel 2j of the group
    s_even = tl.load(s_ptr + factor, mask=ok[:, None], other=0.0)[:, None, :]
    s_odd = tl.load(s_ptr + factor + 1, mask=ok[:, None], other=0.0)[:, None, :]
    z_even = tl.load(z_ptr + factor, mask=ok[:, None], other=0).to(tl.float32)[:, None, :]  # per group, not per token
    z_odd = tl.load(z_ptr + factor + 1, mask=ok[:, None], other=0).to(tl.float32)[:, None, :]
    even = tl.reshape(((code_f32(even, 4, False) - z_even) * s_even).to(DT), (BLOCK_N, D // 2))
    odd = tl.reshape(((code_f32(odd, 4, False) - z_odd) * s_odd).to(DT), (BLOCK_N, D // 2))
    return even, odd


@triton.jit
def _tile_packed(c_ptr, s_ptr, z_ptr, rows, mask_n, SIGNED: tl.constexpr, D: tl.constexpr,
                 GROUP: tl.constexpr, DT: tl.constexpr, BLOCK_N: tl.constexpr):
    """4-bit per-token tile -> dequantized (even, odd) channel halves [BLOCK_N, D/2] in DT: factors
    [row, D / GROUP]; the codes are loaded as [BLOCK_N, D / GROUP, GROUP / 2] bytes so each group's
    scale broadcasts without a gather."""
    NG: tl.constexpr = D // GROUP
    HG: tl.constexpr = GROUP // 2
    g = tl.arange(0, NG)
    j = tl.arange(0, HG)
    mask3 = mask_n[:, None, None]
    packed = tl.load(c_ptr + rows[:, None, None] * (D // 2) + g[None, :, None] * HG + j[None, None, :], mask=mask3,
                     other=0)  # [BLOCK_N, NG, HG]: byte g * HG + j holds channels 2 (g * HG + j) and + 1
    even, odd = unpack_pairs(packed, False)  # the raw nibbles; code_f32 reads them as signed if SIGNED
    factor = rows[:, None] * NG + g[None, :]
    scale = tl.load(s_ptr + factor, mask=mask_n[:, None], other=0.0)[:, :, None]
    even = code_f32(even, 4, SIGNED)
    odd = code_f32(odd, 4, SIGNED)
    if not SIGNED:
        zero = tl.load(z_ptr + factor, mask=mask_n[:, None], other=0).to(tl.float32)[:, :, None]
        even = even - zero
        odd = odd - zero
    even = tl.reshape((even * scale).to(DT), (BLOCK_N, D // 2))
    odd = tl.reshape((odd * scale).to(DT), (BLOCK_N, D // 2))
    return even, odd


@triton.jit
def _online_softmax(scores, m_i, l_i):
    """One step on base-2 scores [BLOCK_H, BLOCK_N]: returns (p, new m, new l, alpha)."""
    m_new = tl.maximum(m_i, tl.max(scores, axis=1))
    m_safe = tl.where(m_new == NEG_INF, 0.0, m_new)
    p = tl.exp2(scores - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    return p, m_new, l_i * alpha + tl.sum(p, axis=1), alpha


@triton.jit
def _split_range(n, start, split, SPLITS, BLOCK_N: tl.constexpr):
    """Slots [lo, hi) of this split: an equal share of [0, n) in whole tiles, from start's tile on."""
    chunk = tl.cdiv(tl.cdiv(n, SPLITS), BLOCK_N) * BLOCK_N
    lo = split * chunk
    hi = tl.minimum(lo + chunk, n)
    return tl.maximum(lo, (start // BLOCK_N) * BLOCK_N), hi


@triton.jit
def _attend_packed(q_rows, mask_h, kc_ptr, ks_ptr, kz_ptr, vc_ptr, vs_ptr, vz_ptr, bh, lo, hi, start,
                   acc_ptr, part_rows, S, qk_scale, MODE: tl.constexpr, D: tl.constexpr, GROUP: tl.constexpr,
                   KG: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr):
    """4-bit cache (int4, or KIVI's quantized part) over slots [lo, hi); stores acc, returns (m, l)."""
    j = tl.arange(0, D // 2)
    q_even = tl.load(q_rows[:, None] + 2 * j[None, :], mask=mask_h[:, None], other=0.0)
    q_odd = tl.load(q_rows[:, None] + 2 * j[None, :] + 1, mask=mask_h[:, None], other=0.0)
    DT: tl.constexpr = q_even.dtype
    acc_even = tl.zeros((BLOCK_H, D // 2), tl.float32)
    acc_odd = tl.zeros((BLOCK_H, D // 2), tl.float32)
    m_i = tl.full((BLOCK_H,), NEG_INF, tl.float32)
    l_i = tl.zeros((BLOCK_H,), tl.float32)
    base = bh * S
    for t0 in range(lo, hi, BLOCK_N):
        slots = t0 + tl.arange(0, BLOCK_N)
        mask_n = slots < hi
        rows = base + slots
        if MODE == 4:
            k_even, k_odd = _key_groups(kc_ptr, ks_ptr, kz_ptr, t0, hi, base, bh * (S // KG), D, KG, DT, BLOCK_N)
            v_even, v_odd = _tile_packed(vc_ptr, vs_ptr, vz_ptr, rows, mask_n, False, D, GROUP, DT, BLOCK_N)
        elif MODE == 5:
            k_even, k_odd = _tile_packed(kc_ptr, ks_ptr, kz_ptr, rows, mask_n, False, D, GROUP, DT, BLOCK_N)
            v_even, v_odd = _tile_packed(vc_ptr, vs_ptr, vz_ptr, rows, mask_n, False, D, GROUP, DT, BLOCK_N)
        else:
            k_even, k_odd = _tile_packed(kc_ptr, ks_ptr, kz_ptr, rows, mask_n, True, D, GROUP, DT, BLOCK_N)
            v_even, v_odd = _tile_packed(vc_ptr, vs_ptr, vz_ptr, rows, mask_n, True, D, GROUP, DT, BLOCK_N)
        scores = mma(q_even, tl.trans(k_even), tl.zeros((BLOCK_H, BLOCK_N), tl.float32))
        scores = mma(q_odd, tl.trans(k_odd), scores) * qk_scale
        scores = tl.where((mask_n & (slots >= start))[None, :], scores, NEG_INF)
        p, m_i, l_i, alpha = _online_softmax(scores, m_i, l_i)
        p = p.to(DT)
        acc_even = mma(p, v_even, acc_even * alpha[:, None])
        acc_odd = mma(p, v_odd, acc_odd * alpha[:, None])
    tl.store(acc_ptr + part_rows[:, None] * D + 2 * j[None, :], acc_even, mask=mask_h[:, None])
    tl.store(acc_ptr + part_rows[:, None] * D + 2 * j[None, :] + 1, acc_odd, mask=mask_h[:, None])
    return m_i, l_i


@triton.jit
def _attend_full(q_rows, mask_h, kc_ptr, ks_ptr, vc_ptr, vs_ptr, bh, lo, hi, start, acc_ptr, part_rows, ROWS,
                 qk_scale, MODE: tl.constexpr, D: tl.constexpr, RING_WRAP: tl.constexpr,
                 BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr):
    """bf16 / fp8 / int8 cache (or KIVI's BF16 window, RING_WRAP: slot p % ROWS) over [lo, hi)."""
    offs_d = tl.arange(0, D)
    q = tl.load(q_rows[:, None] + offs_d[None, :], mask=mask_h[:, None], other=0.0)
    DT: tl.constexpr = q.dtype
    acc = tl.zeros((BLOCK_H, D), tl.float32)
    m_i = tl.full((BLOCK_H,), NEG_INF, tl.float32)
    l_i = tl.zeros((BLOCK_H,), tl.float32)
    base = bh * ROWS
    for t0 in range(lo, hi, BLOCK_N):
        slots = t0 + tl.arange(0, BLOCK_N)
        mask_n = slots < hi
        if RING_WRAP:
            rows = base + slots % ROWS
        else:
            rows = base + slots
        k, k_scale = _tile_full(kc_ptr, ks_ptr, rows, offs_d, mask_n, MODE, D, DT)
        v, v_scale = _tile_full(vc_ptr, vs_ptr, rows, offs_d, mask_n, MODE, D, DT)
        scores = mma(q, tl.trans(k), tl.zeros((BLOCK_H, BLOCK_N), tl.float32))
        scores = scores * (k_scale * qk_scale)[None, :]
        scores = tl.where((mask_n & (slots >= start))[None, :], scores, NEG_INF)
        p, m_i, l_i, alpha = _online_softmax(scores, m_i, l_i)
        acc = mma((p * v_scale[None, :]).to(DT), v, acc * alpha[:, None])
    tl.store(acc_ptr + part_rows[:, None] * D + offs_d[None, :], acc, mask=mask_h[:, None])
    return m_i, l_i


@triton.jit
def kv_attention_kernel(q_ptr, q_stride_b, q_stride_h,
                        kc_ptr, ks_ptr, kz_ptr, vc_ptr, vs_ptr, vz_ptr, rk_ptr, rv_ptr,
                        start_ptr, slot_ptr, m_ptr, l_ptr, acc_ptr,
                        H, S, RING, RESIDUAL, qk_scale, SPLITS, PARTS,
                        MODE: tl.constexpr, D: tl.constexpr, GROUP: tl.constexpr, KG: tl.constexpr,
                        REP: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, SINK: tl.constexpr):
    """qk_scale = log2(e) / sqrt(D): scores live in base 2 (exp2 is the fast path). SPLITS and PARTS
    (= SPLITS, + 1 for KIVI's window or the sink) are runtime values: one binary serves every split
    count. With a sink, rk_ptr / rv_ptr are the BF16 sink [B, H, SINK, D] and RING = SINK."""
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // H
    h = bh % H
    n = tl.load(slot_ptr) + 1
    start = tl.load(start_ptr + b)
    rows_h = tl.arange(0, BLOCK_H)
    mask_h = rows_h < REP
    q_rows = q_ptr + b * q_stride_b + (h * REP + rows_h) * q_stride_h
    part_rows = (b * H * REP + h * REP + rows_h) * PARTS + split
    if MODE == 4:
        n_quant = KG * (tl.maximum(n - RESIDUAL, 0) // KG)
        if split == SPLITS:  # the BF16 window: positions [n_quant, n)
            m_i, l_i = _attend_full(q_rows, mask_h, rk_ptr, ks_ptr, rv_ptr, vs_ptr, bh, tl.maximum(n_quant, start),
                                    n, start, acc_ptr, part_rows, RING, qk_scale, MODE, D, True, BLOCK_H, BLOCK_N)
        else:
            lo, hi = _split_range(n_quant, start, split, SPLITS, BLOCK_N)
            m_i, l_i = _attend_packed(q_rows, mask_h, kc_ptr, ks_ptr, kz_ptr, vc_ptr, vs_ptr, vz_ptr, bh, lo, hi,
                                      start, acc_ptr, part_rows, S, qk_scale, MODE, D, GROUP, KG, BLOCK_H, BLOCK_N)
    elif SINK > 0 and split == SPLITS:  # the BF16 sink: row positions [0, min(SINK, n - start))
        m_i, l_i = _attend_full(q_rows, mask_h, rk_ptr, ks_ptr, rv_ptr, vs_ptr, bh, 0, tl.minimum(n - start, SINK),
                                0, acc_ptr, part_rows, SINK, qk_scale, 0, D, False, BLOCK_H, BLOCK_N)
    elif MODE == 3 or MODE == 5:
        lo, hi = _split_range(n, start + SINK, split, SPLITS, BLOCK_N)
        m_i, l_i = _attend_packed(q_rows, mask_h, kc_ptr, ks_ptr, kz_ptr, vc_ptr, vs_ptr, vz_ptr, bh, lo, hi,
                                  start + SINK, acc_ptr, part_rows, S, qk_scale, MODE, D, GROUP, KG, BLOCK_H, BLOCK_N)
    else:
        lo, hi = _split_range(n, start + SINK, split, SPLITS, BLOCK_N)
        m_i, l_i = _attend_full(q_rows, mask_h, kc_ptr, ks_ptr, vc_ptr, vs_ptr, bh, lo, hi, start + SINK,
                                acc_ptr, part_rows, S, qk_scale, MODE, D, False, BLOCK_H, BLOCK_N)
    tl.store(m_ptr + part_rows, m_i, mask=mask_h)
    tl.store(l_ptr + part_rows, l_i, mask=mask_h)


@triton.jit
def kv_attention_reduce_kernel(m_ptr, l_ptr, acc_ptr, out_ptr, PARTS, BLOCK_P: tl.constexpr, D: tl.constexpr):
    row = tl.program_id(0)  # b * Hq + query head
    parts = tl.arange(0, BLOCK_P)
    mask = parts < PARTS
    m = tl.load(m_ptr + row * PARTS + parts, mask=mask, other=NEG_INF)
    l = tl.load(l_ptr + row * PARTS + parts, mask=mask, other=0.0)
    m_max = tl.max(m, axis=0)
    w = tl.where(m == NEG_INF, 0.0, tl.exp2(m - m_max))
    offs_d = tl.arange(0, D)
    acc = tl.load(acc_ptr + (row * PARTS + parts)[:, None] * D + offs_d[None, :], mask=mask[:, None], other=0.0)
    out = tl.sum(acc * w[:, None], axis=0) / tl.sum(l * w, axis=0)
    store_as(out_ptr + row * D + offs_d, out)
