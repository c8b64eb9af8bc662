"""The tokens-form grouped FP8 GEMM (grad_weight) as ONE flat loop over (tile, chunk) pairs.

kernels/grouped_gemm.py's `tokens_kernel` runs a K loop per output tile whose trip count is its
expert's token count / BK. Triton cannot fuse loops whose inner trip count varies, so every tile
refills the load pipeline and drains the tensor cores before its epilogue: about a microsecond per
tile, against ~18 us of work per 128 x 256 tile at 4096 tokens per expert but only ~5 us at 1024.

Here a program runs all chunks of all its tiles in one `for` loop, the form Triton's own loop fusion
produces: iteration i loads chunk c of the current tile; after its last chunk an `if` stores the
tile and steps to the next one (pid + num_programs), so the loads of the next tile are already in
flight while the epilogue runs. The body has no inner loop (Triton only pipelines loop bodies
without loops), which costs two restrictions:
  * every group must start and end on a multiple of BK (128): no ragged tail. Blockwise grad_weight
    needs that anyway; tensorwise callers opt in (`groups_aligned=True`) by padding the groups.
    A tile whose expert breaks it is stored as NaN, loudly, instead of silently wrong.
  * an expert without tokens still runs one chunk, loaded past the end of the token dimension
    (TMA and the pointer masks read zeros there), so its tiles store exact zeros.
The chunk count of a program, sum over its tiles of max(tokens / BK, 1), comes from `offs` with
vector arithmetic: program p owns the tiles t = p (mod P) of each expert's contiguous tile range.
"""

from __future__ import annotations

import triton
import triton.language as tl

from kernels.grouped_gemm import band_order, store_tile, token_span, tokens_chunk


@triton.jit
def _owned(x, p, P):
    """How many of the tile ids 0 .. x-1 program p visits (p, p + P, p + 2P, ...)."""
    return tl.where(x > p, (x - p + P - 1) // P, 0)


@triton.jit
def _program_chunks(offs_ptr, E, T, per_expert, BK: tl.constexpr, E_POW2: tl.constexpr):
    """Total chunk iterations of this program: sum over its tiles of max(tokens of e // BK, 1)."""
    idx = tl.arange(0, E_POW2)
    ends = tl.minimum(tl.maximum(tl.load(offs_ptr + idx, mask=idx < E, other=0), 0), T)
    starts = tl.load(offs_ptr + idx - 1, mask=(idx >= 1) & (idx < E), other=0)
    starts = tl.minimum(tl.maximum(starts, 0), T)
    chunks = tl.maximum((tl.maximum(ends, starts) - starts) // BK, 1)
    p = tl.program_id(0)
    P = tl.num_programs(0)
    mine = _owned((idx + 1) * per_expert, p, P) - _owned(idx * per_expert, p, P)
    return tl.sum(tl.where(idx < E, mine * chunks, 0), axis=0)


@triton.jit
def _tile_setup(tile, E, T, offs_ptr, per_expert, m_tiles, n_tiles, BK: tl.constexpr, GROUP_M: tl.constexpr):
    """Expert, tile coordinates, token span and chunk count of tile id `tile` (clamped past the end)."""
    e = tl.minimum(tile // per_expert, E - 1)
    pid_m, pid_n = band_order(tile % per_expert, m_tiles, n_tiles, GROUP_M)
    start, end = token_span(offs_ptr, e, T)
    return e, pid_m, pid_n, start, end, tl.maximum((end - start) // BK, 1)


@triton.jit
def tokens_kernel_flat(a_ptr, b_ptr, out_ptr, offs_ptr, sa_ptr, sb_ptr,
                       M, N, T, E, stride_a, stride_b, stride_out_e, stride_out_m,
                       stride_sa_m, stride_sa_t, stride_sb_n, stride_sb_t,
                       BLOCKWISE: tl.constexpr, FAST_ACCUM: tl.constexpr, USE_TMA: tl.constexpr,
                       BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
                       NUM_STAGES: tl.constexpr, E_POW2: tl.constexpr):
    """out [E, M, N] as tokens_kernel computes it, for groups aligned to BK (else NaN tiles)."""
    m_tiles = tl.cdiv(M, BM)
    n_tiles = tl.cdiv(N, BN)
    per_expert = m_tiles * n_tiles
    a_desc = None
    b_desc = None
    if USE_TMA:
        a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, T], strides=[stride_a, 1], block_shape=[BM, BK])
        b_desc = tl.make_tensor_descriptor(b_ptr, shape=[N, T], strides=[stride_b, 1], block_shape=[BN, BK])
    tile = tl.program_id(0)
    e, pid_m, pid_n, start, end, chunks = _tile_setup(tile, E, T, offs_ptr, per_expert, m_tiles, n_tiles, BK,
                                                      GROUP_M)
    c = 0
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for _ in tl.range(0, _program_chunks(offs_ptr, E, T, per_expert, BK, E_POW2), num_stages=NUM_STAGES):
        t0 = tl.where(end > start, start + c * BK, T)  # an empty expert's one chunk: zeros past the data
        acc = tokens_chunk(acc, a_ptr, a_desc, b_ptr, b_desc, sa_ptr, sb_ptr, pid_m * BM, pid_n * BN, t0,
                           M, N, end, stride_a, stride_b, stride_sa_m, stride_sa_t, stride_sb_n, stride_sb_t,
                           BLOCKWISE, FAST_ACCUM, USE_TMA, BM, BN, BK)
        last = c + 1 == chunks
        if last:  # the tile is complete: store it and restart the accumulator
            misaligned = (start % BK != 0) | (end % BK != 0)
            out = acc if BLOCKWISE else acc * (tl.load(sa_ptr) * tl.load(sb_ptr))
            out = tl.where(misaligned, float("nan"), out)
            store_tile(out_ptr + e.to(tl.int64) * stride_out_e, out, pid_m * BM, M, pid_n * BN, N, stride_out_m,
                       BM, BN)
            acc = tl.zeros([BM, BN], dtype=tl.float32)
        # The cursor moves with selects outside the `if`: the pipeliner then computes the addresses
        # of the next NUM_STAGES - 1 chunks ahead of this one's MMA (moved inside the `if`, it could
        # prefetch only one). The accumulator's reset stays inside: the dot may then stay in flight.
        c = tl.where(last, 0, c + 1)
        tile = tl.where(last, tile + tl.num_programs(0), tile)
        e, pid_m, pid_n, start, end, chunks = _tile_setup(tile, E, T, offs_ptr, per_expert, m_tiles, n_tiles,
                                                          BK, GROUP_M)
