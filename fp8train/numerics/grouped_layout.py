"""The row layouts the MoE grouped FP8 GEMMs read, computed on the device with static shapes.

Tokens arrive sorted by expert: X [T, K] is E contiguous row groups X_e; `group_sizes` [E] lives on
the device and is never read on the host. The grouped GEMMs (kernels/grouped_gemm_ops.py) take
`offs`, the int32 END row of every group. Two layouts, both with a row count that depends on static
sizes only (T, E), never on the routing, so the block compiles without graph breaks and a CUDA
graph replays it with any routing:

    ragged   the rows as dispatched, offs = cumsum(group_sizes). The experts form (output,
             grad_input) always reads it: a group's last row tile is computed whole and stored only
             up to the group's end (~BM/2 rows of waste per expert), and nothing is copied back.
    padded   every group starts on a multiple of `align` rows, zero rows between groups and after
             the last: a buffer of the static bound round_up(T + E * (align - 1), align) rows, which
             any routing fits. The token-major operands of the tokens form (grad_weight) use it
             with align 128, ONE rule for every recipe that pads (FP8GroupedLinear.tokens_align):
               blockwise   required: DeepSeek-V3's 128x1 token tiles must not straddle two experts;
               tensorwise  the default on the kernel backend: whole 128-token chunks per expert let
                           the grad_weight kernel read through TMA (ragged groups must use pointer
                           loads: 0.66 vs 0.26 ms on an H200, benchmarks/results/h200x4_session4).
             Zero tokens add nothing to a grad_weight sum, and only the token-major copies are
             padded: output and grad_input rows stay ragged, so nothing is dropped afterwards.

    X [T, K]  --index_copy(dest_rows)-->  X_pad [bound, K]     expert e at rows [s_e, s_e + P_e)
    row_of [bound]: the ragged row at every padded row, -1 for padding (the inverse of dest_rows;
    kernels.gather_rows writes the token-major FP8 copy from it, column by column)

The ragged token-major operands have the tokens as their inner dimension: TMA wants that row
stride 16-byte aligned, so `token_pad(T)` rounds the token count up to 16 (zero tokens at the END;
nothing past offs[-1] is ever read as part of a group).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

TOKEN_ALIGN = 16  # TMA: row strides of the token-major operands in multiples of 16 bytes


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def token_pad(tokens: int) -> int:
    """Token count of the token-major (transposed) operands: T rounded up to 16."""
    return round_up(tokens, TOKEN_ALIGN)


def _memoized(group_sizes: torch.Tensor, key: tuple, make):
    """make(), computed once per group_sizes tensor (and its in-place version) in eager mode: the three
    projections of an MoE layer and their backward share one layout instead of a few small kernels
    each. While torch.compile traces, nothing is stored on the tensor (the graph computes it)."""
    if torch.compiler.is_compiling():
        return make()
    memo = group_sizes.__dict__.setdefault("_fp8_layouts", {})
    key = (*key, group_sizes._version)
    if key not in memo:
        memo[key] = make()
    return memo[key]


def group_ends(group_sizes: torch.Tensor) -> torch.Tensor:
    """int32 [E]: the END row of every group of the ragged layout (the kernels' `offs`), on the device."""
    return _memoized(group_sizes, ("ends",), lambda: torch.cumsum(group_sizes, dim=0).to(torch.int32))


def padded_bound(tokens: int, num_experts: int, align: int) -> int:
    """Rows of the padded layout: enough for any split of `tokens` rows into `num_experts` groups."""
    return round_up(tokens + num_experts * (align - 1), align)


@dataclass(frozen=True)
class PaddedGroups:
    """The padded layout of one routing: device tensors plus its static row count."""

    offs: torch.Tensor       # int32 [E] END rows of the padded groups (multiples of align)
    dest_rows: torch.Tensor  # int64 [T] row of every real row in the padded layout
    row_of: torch.Tensor     # int64 [rows] ragged row at every padded row, -1 for padding rows
    rows: int                # static: padded_bound(T, E, align)
    align: int               # static: every group starts on a multiple of it


def padded_groups(group_sizes: torch.Tensor, tokens: int, align: int) -> PaddedGroups:
    """Groups of `group_sizes` rows, each rounded up to `align` rows, placed back to back.

    Row i of expert e moves by (padded start of e) - (start of e). The expert of every row comes
    from a binary search of the group ends: no host sync, shapes fixed by `tokens` alone.
    """
    return _memoized(group_sizes, ("padded", tokens, align), lambda: _padded_groups(group_sizes, tokens, align))


def _padded_groups(group_sizes: torch.Tensor, tokens: int, align: int) -> PaddedGroups:
    counts = group_sizes.to(torch.int64)
    padded = (counts + (align - 1)) // align * align
    padded_ends, ends = torch.cumsum(padded, 0), torch.cumsum(counts, 0)
    shift = (padded_ends - padded) - (ends - counts)  # [E]
    rows = torch.arange(tokens, device=counts.device)
    expert_of_row = torch.searchsorted(ends, rows, right=True).clamp_max(counts.numel() - 1)
    dest_rows = rows + shift[expert_of_row]
    bound = padded_bound(tokens, counts.numel(), align)
    row_of = torch.full((bound,), -1, dtype=torch.int64, device=counts.device).index_copy_(0, dest_rows, rows)
    return PaddedGroups(padded_ends.to(torch.int32), dest_rows, row_of, bound, align)


def scatter_rows(x: torch.Tensor, groups: PaddedGroups) -> torch.Tensor:
    """x [T, C] -> zero-initialised [groups.rows, C] with every row at its padded place (one index op)."""
    return x.new_zeros(groups.rows, x.shape[1]).index_copy_(0, groups.dest_rows, x)


def gather_to_padded(x: torch.Tensor, token_index: torch.Tensor, groups: PaddedGroups) -> torch.Tensor:
    """x[token_index] placed in the padded layout [groups.rows, C], in one gather: every padded row
    reads its source token, padding rows read an appended zero row (no zero-fill, no second pass)."""
    source = torch.full((groups.rows,), x.shape[0], dtype=torch.int64, device=x.device)
    source.index_copy_(0, groups.dest_rows, token_index)
    return torch.cat([x, x.new_zeros(1, x.shape[1])]).index_select(0, source)


def pad_rows_to(x: torch.Tensor, rows: int) -> torch.Tensor:
    """x [T, C] with zero rows appended up to `rows` (no copy when nothing is missing)."""
    extra = rows - x.shape[0]
    return x if extra == 0 else torch.cat([x, x.new_zeros(extra, x.shape[1])])
