"""Grouped FP8 GEMMs of a mixture-of-experts layer in Triton: all experts in one persistent launch.

Tokens sorted by expert form row groups; `offs` [E] (int32, on the device) holds the END row of
every group, as torch._scaled_grouped_mm's `offs` does: expert e owns rows [offs[e-1], offs[e]).
Both kernels are "NT" (both operands row-major along the contraction), the one layout in which
Hopper's FP8 tensor cores (wgmma) read both operands straight from shared memory:

    experts form  out [T, N]     rows of e = A[rows of e] . B[e]^T       A [T, K], B [E, N, K]
                  (the MoE output and grad_input GEMMs; contraction K)
    tokens form   out [E, N, K]  out[e]    = A[:, tokens of e] . B[:, tokens of e]^T
                  (grad_weight; A [N, T], B [K, T]; contraction over expert e's tokens)

Scaling (decode factors, x ~= fp8 * scale_inv; accumulation always FP32):
    TENSORWISE  one factor per operand (per expert for the experts form's B), applied once in the
                epilogue: out = acc * (sa * sb). FAST_ACCUM=False promotes the tensor-core partial
                sums into the FP32 accumulator every BK elements (max_num_imprecise_acc); True
                lets the tensor core accumulate the whole contraction (torch's use_fast_accum).
    BLOCKWISE   DeepSeek-V3: every 128-wide chunk c of the contraction is one dot, promoted as
                acc += dot_c * (sa_c[:, None] * sb_c[None, :]); BK must be 128. An experts-form
                tile of <= 128 columns lies in one weight block, so sb_c is one number there and
                the promotion is one FMA per element: acc += dot_c * (sa_c * sb_c)[:, None].
                Experts form: A 1x128 tiles sa [T, K/128], B 128x128 blocks sb [E, N/128, K/128]. Tokens form:
                both operands 1x128 tiles along tokens, sa [N, T/128], sb [K, T/128]; every group
                must start and end on a multiple of 128 (a group that does not gets NaN outputs).

Tile scheduling without host syncs. The grid is persistent (about one program per SM); every
program walks the tile list with stride num_programs and exits when it runs out:
  * experts form: each program loads `offs` once as a vector of E_POW2 slots to count the tiles
    (cdiv(rows of g, BM) x N-tiles per group). Its tiles come in increasing order, so it finds each
    tile's group with a scalar cursor that only moves forward (one load of offs[g] per step, no
    vector reductions or barriers per tile); inside a group, tiles go in GROUP_M-high bands (L2
    reuse of A rows and of B_e). Slot E is a pseudo group, rows [offs[E-1], T): computed with the
    last expert's weight (every tile has the same K trip count, which lets Triton fuse the tile and
    K loops when FLATTEN) and stored as zeros, so every element of `out` is written. Rows past a
    group's end in its last M-tile are computed with the wrong expert but never stored: ragged groups
    need no padding, at a cost of BM/2 rows per expert on average.
  * tokens form: E x (M/BM) x (N/BN) output tiles, all full; a tile's contraction runs over its
    expert's tokens only: full BK chunks, then the ragged tail in TAIL_K chunks whose columns past
    the expert's end are zeroed by the pointer load's mask. TMA reads only 128-aligned groups (the
    launcher's rule: TMA boxes at ragged token coordinates died with an illegal instruction on an
    H200), which have no tail.
    An expert without tokens gets exact zeros. (Its K trip count varies per tile, so Triton cannot
    fuse the two loops: each tile refills the pipeline.)

USE_TMA loads operand tiles with device-side tensor descriptors (tl.make_tensor_descriptor; the
launcher installs the global-scratch allocator they need), else with masked pointer loads.
Every store is a masked pointer store.
"""

from __future__ import annotations

import triton
import triton.language as tl

from fp8train.quant.schemes import BLOCK
from kernels.fp8_triton import INTERPRET

SCALE_BLOCK = tl.constexpr(BLOCK)  # the core's DeepSeek-V3 tile edge: blockwise scales change every 128


@triton.jit
def band_order(local, m_tiles, n_tiles, GROUP_M: tl.constexpr):
    """Tile `local` of an m_tiles x n_tiles grid -> (pid_m, pid_n), GROUP_M-high bands first."""
    band = GROUP_M * n_tiles
    first_m = (local // band) * GROUP_M
    height = tl.minimum(m_tiles - first_m, GROUP_M)
    pid_m = first_m + (local % band) % height
    pid_n = (local % band) // height
    return pid_m, pid_n


@triton.jit
def _group_spans(offs_ptr, E, T, E_POW2: tl.constexpr):
    """(starts, ends) [E_POW2] of the row groups; slot E is the unowned tail [offs[E-1], T).
    Ends are clamped to [0, T] and groups to size >= 0, so bad offsets cannot leave the buffer."""
    idx = tl.arange(0, E_POW2)
    ends = tl.load(offs_ptr + idx, mask=idx < E, other=0)
    ends = tl.where(idx < E, tl.minimum(tl.maximum(ends, 0), T), T)
    starts = tl.load(offs_ptr + idx - 1, mask=(idx >= 1) & (idx <= E), other=0)
    starts = tl.where(idx <= E, tl.minimum(tl.maximum(starts, 0), T), T)
    return starts, tl.maximum(ends, starts)


@triton.jit
def _slot(offs_ptr, g, E, T):
    """(start, end) of group slot g, exactly as _group_spans defines it (the walk's tile counts must
    add up to the vector's total, whatever the offsets hold)."""
    start = tl.where(g > 0, tl.load(offs_ptr + tl.maximum(tl.minimum(g, E) - 1, 0)), 0)
    start = tl.minimum(tl.maximum(start, 0), T)
    end = tl.where(g < E, tl.load(offs_ptr + tl.minimum(g, E - 1)), T)
    end = tl.minimum(tl.maximum(end, 0), T)
    return start, tl.maximum(end, start)


@triton.jit
def _load_rows(ptr, desc, row0, k0, row_end, col_end, stride, BR: tl.constexpr, BC: tl.constexpr,
               USE_TMA: tl.constexpr):
    """[BR, BC] tile at (row0, k0) of a row-major matrix, zeros from column col_end on. Rows past
    row_end: zeros on the pointer path; TMA reads them (the caller never stores their products)."""
    if USE_TMA:
        tile = desc.load([row0, k0])
    else:
        rows = row0 + tl.arange(0, BR)
        cols = k0 + tl.arange(0, BC)
        mask = (rows[:, None] < row_end) & (cols[None, :] < col_end)
        tile = tl.load(ptr + rows.to(tl.int64)[:, None] * stride + cols[None, :], mask=mask, other=0.0)
    return tile


@triton.jit
def _load_expert_rows(ptr, desc, e, row0, k0, n_rows, n_cols, stride_e, stride_n, BR: tl.constexpr,
                      BC: tl.constexpr, USE_TMA: tl.constexpr):
    """[BR, BC] tile at (row0, k0) of expert e's [n_rows, n_cols] matrix, zeros outside it (a 3-D
    descriptor bounds every expert on its own, so no tile reads into the next expert's rows)."""
    if USE_TMA:
        tile = desc.load([e, row0, k0]).reshape(BR, BC)
    else:
        rows = row0 + tl.arange(0, BR)
        cols = k0 + tl.arange(0, BC)
        mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
        offsets = e.to(tl.int64) * stride_e + rows.to(tl.int64)[:, None] * stride_n + cols[None, :]
        tile = tl.load(ptr + offsets, mask=mask, other=0.0)
    return tile


@triton.jit
def store_tile(out_ptr, acc, row0, row_end, col0, n_cols, stride, BR: tl.constexpr, BC: tl.constexpr):
    rows = row0 + tl.arange(0, BR)
    cols = col0 + tl.arange(0, BC)
    mask = (rows[:, None] < row_end) & (cols[None, :] < n_cols)
    ptrs = out_ptr + rows.to(tl.int64)[:, None] * stride + cols[None, :]
    tl.store(ptrs, _round_to(acc, out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _round_to(acc, dtype: tl.constexpr):
    """FP32 -> out dtype, round to nearest even. The interpreter's FP32 -> BF16 conversion truncates,
    so there BF16 is rounded on the bits (NaN kept); compiled kernels use the hardware conversion."""
    if INTERPRET and dtype == tl.bfloat16:
        bits = acc.to(tl.int32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(acc != acc, 0x7FC0, rounded)
        out = rounded.to(tl.int16).to(tl.bfloat16, bitcast=True)
    else:
        out = acc.to(dtype)
    return out


@triton.jit
def experts_kernel(a_ptr, b_ptr, out_ptr, offs_ptr, sa_ptr, sb_ptr,
                   T, N, K, E, stride_a, stride_be, stride_bn, stride_out,
                   stride_sa_m, stride_sa_k, stride_sb_e, stride_sb_n, stride_sb_k,
                   BLOCKWISE: tl.constexpr, FAST_ACCUM: tl.constexpr, USE_TMA: tl.constexpr,
                   FLATTEN: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                   GROUP_M: tl.constexpr, NUM_STAGES: tl.constexpr, E_POW2: tl.constexpr):
    """out [T, N] = rows of each group . B[g]^T (see the module docstring). B [E, N, K] with any
    expert and row strides. Tensorwise: sa [1], sb [E] or [1] (stride_sb_e 0); blockwise: sa
    [T, K/128], sb [E, N/128, K/128], any strides."""
    starts, ends = _group_spans(offs_ptr, E, T, E_POW2)
    n_tiles = tl.cdiv(N, BN)
    total = tl.sum(tl.cdiv(ends - starts, BM), axis=0) * n_tiles
    k_tiles = tl.cdiv(K, BK)
    a_desc = None
    b_desc = None
    if USE_TMA:
        a_desc = tl.make_tensor_descriptor(a_ptr, shape=[T, K], strides=[stride_a, 1], block_shape=[BM, BK])
        b_desc = tl.make_tensor_descriptor(b_ptr, shape=[E, N, K], strides=[stride_be, stride_bn, 1],
                                           block_shape=[1, BN, BK])
    g = 0  # the group walk: a program's tiles come in increasing order, so its group only advances
    start, end = _slot(offs_ptr, 0, E, T)
    first = 0
    count = tl.cdiv(end - start, BM) * n_tiles
    for tile in tl.range(tl.program_id(0), total, tl.num_programs(0), flatten=FLATTEN):
        while (tile >= first + count) & (g < E):  # scalar steps, no vector reductions or barriers
            first += count
            g += 1
            start, end = _slot(offs_ptr, g, E, T)
            count = tl.cdiv(end - start, BM) * n_tiles
        pid_m, pid_n = band_order(tile - first, tl.cdiv(end - start, BM), n_tiles, GROUP_M)
        row0 = start + pid_m * BM
        row_end = end
        col0 = pid_n * BN
        real = g < E  # slot E: rows no expert owns, computed with expert E-1's weight, stored as zeros
        w = tl.minimum(g, E - 1)  # (a trip count that does not vary per tile lets Triton fuse the loops)
        acc = tl.zeros([BM, BN], dtype=tl.float32)
        for kt in tl.range(0, k_tiles, num_stages=NUM_STAGES):
            a = _load_rows(a_ptr, a_desc, row0, kt * BK, T, K, stride_a, BM, BK, USE_TMA)
            b = _load_expert_rows(b_ptr, b_desc, w, col0, kt * BK, N, K, stride_be, stride_bn, BN, BK, USE_TMA)
            if BLOCKWISE:
                rows = row0 + tl.arange(0, BM)
                sa = tl.load(sa_ptr + rows.to(tl.int64) * stride_sa_m + kt * stride_sa_k, mask=rows < T, other=0.0)
                if BN <= SCALE_BLOCK:  # the tile's columns lie in one 128-wide block of B: one factor,
                    # folded into the row factors, so the promotion is one FMA per element, not two ops
                    sb_one = tl.load(sb_ptr + w * stride_sb_e + (col0 // SCALE_BLOCK) * stride_sb_n + kt * stride_sb_k)
                    acc += tl.dot(a, b.T) * (sa * sb_one)[:, None]
                else:
                    cols = col0 + tl.arange(0, BN)
                    sb = tl.load(sb_ptr + w * stride_sb_e + (cols // SCALE_BLOCK) * stride_sb_n + kt * stride_sb_k,
                                 mask=cols < N, other=0.0)
                    acc += tl.dot(a, b.T) * (sa[:, None] * sb[None, :])
            else:
                acc = tl.dot(a, b.T, acc, max_num_imprecise_acc=None if FAST_ACCUM else BK)
        if not BLOCKWISE:
            scale = tl.load(sa_ptr) * tl.load(sb_ptr + w * stride_sb_e)
            acc = acc * scale
        acc = tl.where(real, acc, 0.0)
        store_tile(out_ptr, acc, row0, row_end, col0, N, stride_out, BM, BN)


@triton.jit
def token_span(offs_ptr, e, T):
    """[start, end) of expert e's tokens, clamped to [0, T] and to size >= 0."""
    end = tl.minimum(tl.maximum(tl.load(offs_ptr + e), 0), T)
    start = tl.where(e > 0, tl.load(offs_ptr + tl.maximum(e - 1, 0)), 0)
    start = tl.minimum(tl.maximum(start, 0), T)
    return start, tl.maximum(end, start)


@triton.jit
def tokens_chunk(acc, a_ptr, a_desc, b_ptr, b_desc, sa_ptr, sb_ptr, row0, col0, t0, M, N, end,
                 stride_a, stride_b, stride_sa_m, stride_sa_t, stride_sb_n, stride_sb_t,
                 BLOCKWISE: tl.constexpr, FAST_ACCUM: tl.constexpr, USE_TMA: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """acc + the BK tokens from t0 (zeros past `end`); blockwise promotes with the chunk's scales
    (none are read for a chunk that starts at or past `end`: the flat kernel's empty-expert chunk)."""
    a = _load_rows(a_ptr, a_desc, row0, t0, M, end, stride_a, BM, BK, USE_TMA)
    b = _load_rows(b_ptr, b_desc, col0, t0, N, end, stride_b, BN, BK, USE_TMA)
    if BLOCKWISE:
        rows = row0 + tl.arange(0, BM)
        cols = col0 + tl.arange(0, BN)
        chunk = t0 // SCALE_BLOCK
        live = t0 < end  # (a bool tensor & a bool scalar trips the interpreter: limits instead)
        sa = tl.load(sa_ptr + rows.to(tl.int64) * stride_sa_m + chunk * stride_sa_t, mask=rows < tl.where(live, M, 0),
                     other=0.0)
        sb = tl.load(sb_ptr + cols.to(tl.int64) * stride_sb_n + chunk * stride_sb_t, mask=cols < tl.where(live, N, 0),
                     other=0.0)
        acc += tl.dot(a, b.T) * (sa[:, None] * sb[None, :])
    else:
        acc = tl.dot(a, b.T, acc, max_num_imprecise_acc=None if FAST_ACCUM else BK)
    return acc


@triton.jit
def tokens_kernel(a_ptr, b_ptr, out_ptr, offs_ptr, sa_ptr, sb_ptr,
                  M, N, T, E, stride_a, stride_b, stride_out_e, stride_out_m,
                  stride_sa_m, stride_sa_t, stride_sb_n, stride_sb_t,
                  BLOCKWISE: tl.constexpr, FAST_ACCUM: tl.constexpr, USE_TMA: tl.constexpr,
                  FLATTEN: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                  TAIL_K: tl.constexpr, GROUP_M: tl.constexpr, NUM_STAGES: tl.constexpr):
    """out [E, M, N]: out[e] = A[:, tokens of e] . B[:, tokens of e]^T, A [M, T], B [N, T].
    Tensorwise: sa [1], sb [1]; blockwise: sa [M, T/128], sb [N, T/128], any strides."""
    m_tiles = tl.cdiv(M, BM)
    n_tiles = tl.cdiv(N, BN)
    per_expert = m_tiles * n_tiles
    a_desc = None
    b_desc = None
    if USE_TMA:
        a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, T], strides=[stride_a, 1], block_shape=[BM, BK])
        b_desc = tl.make_tensor_descriptor(b_ptr, shape=[N, T], strides=[stride_b, 1], block_shape=[BN, BK])
    for tile in tl.range(tl.program_id(0), E * per_expert, tl.num_programs(0), flatten=FLATTEN):
        e = tile // per_expert
        pid_m, pid_n = band_order(tile % per_expert, m_tiles, n_tiles, GROUP_M)
        row0 = pid_m * BM
        col0 = pid_n * BN
        start, end = token_span(offs_ptr, e, T)
        n_full = (end - start) // BK
        acc = tl.zeros([BM, BN], dtype=tl.float32)
        for c in tl.range(0, n_full, num_stages=NUM_STAGES):
            acc = tokens_chunk(acc, a_ptr, a_desc, b_ptr, b_desc, sa_ptr, sb_ptr, row0, col0, start + c * BK,
                               M, N, end, stride_a, stride_b, stride_sa_m, stride_sa_t, stride_sb_n, stride_sb_t,
                               BLOCKWISE, FAST_ACCUM, USE_TMA, BM, BN, BK)
        if BLOCKWISE:  # a 128-token tile straddling two experts has no meaning: say so loudly
            misaligned = (start % SCALE_BLOCK != 0) | (end % SCALE_BLOCK != 0)
            acc = tl.where(misaligned, float("nan"), acc)
        else:  # the ragged tail of the expert's tokens, TAIL_K at a time, masked at `end`
            for t0 in tl.range(start + n_full * BK, end, TAIL_K):
                a = _load_rows(a_ptr, None, row0, t0, M, end, stride_a, BM, TAIL_K, False)  # masked at `end`
                b = _load_rows(b_ptr, None, col0, t0, N, end, stride_b, BN, TAIL_K, False)
                acc = tl.dot(a, b.T, acc, max_num_imprecise_acc=None if FAST_ACCUM else TAIL_K)
            acc = acc * (tl.load(sa_ptr) * tl.load(sb_ptr))
        store_tile(out_ptr + e.to(tl.int64) * stride_out_e, acc, row0, M, col0, N, stride_out_m, BM, BN)
