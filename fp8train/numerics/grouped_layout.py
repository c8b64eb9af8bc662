"""The padded layout of the MoE grouped GEMMs: expert groups aligned to 16 or 128 rows.

Tokens arrive sorted by expert: X [T, K] is E contiguous row groups X_e of `group_sizes` rows.
Each group is zero-padded to P_e, a multiple of `align` rows, and the groups sit back to back
in one buffer of T_pad = sum(P_e) rows:

    X [T, K]  --one index_copy-->  X_pad [T_pad, K]      expert e at rows [s_e, s_e + P_e)
    cast(X_pad, need_cols=True)    rows [T_pad, K] and cols [K, T_pad]: ONE cast (one kernel on
                                   GPU, one amax record for delayed scaling) for all experts
    X_e_rows = rows.data[s_e : s_e + P_e]        [P_e, K]  contiguous rows
    X_e_cols = cols.data[:, s_e : s_e + P_e]     [K, P_e]  a view, row-major with leading dim T_pad

The backward scatters dY the same way and casts it once. Zero rows add nothing to any product and
never raise an amax, so the padding changes no value. Why align:
  * 16 (tensorwise): cuBLAS FP8 GEMMs need the contraction dimension (P_e in grad_weight), the
    leading dimensions and the data pointers 16-aligned; with P_e and s_e multiples of 16 the
    backend never pads or copies a token-major operand.
  * 128 (blockwise): DeepSeek-V3's 128x1 token tiles of the grad_weight operands must not straddle
    two experts; with s_e and P_e multiples of 128 the tiles of X_pad are exactly the tiles each
    expert's rows would get alone.
The cols views (`QuantizedTensor.cols`) are the one place an operand's data is not contiguous: torch._scaled_mm takes a
matrix whose inner stride is 1 and outer stride >= its width as it is, passing that stride to
cuBLAS as the leading dimension (cublasCommonArgs / prepare_matrix_for_cublas), so no copy
(checked on the H100: tests/gpu/test_scaled_mm_backend.py, strided-view tests).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate

import torch


TENSORWISE_ALIGN = 16  # cuBLAS FP8: contraction dim, leading dims and pointers 16-byte aligned


@dataclass(frozen=True)
class AlignedGroups:
    """Where each expert's rows sit in the padded layout: host ints plus one device index."""

    sizes: list[int]          # real rows per expert
    padded_sizes: list[int]   # each rounded up to the alignment
    padded_starts: list[int]  # first row of each expert in the padded layout
    total: int                # T_pad
    dest_rows: torch.Tensor | None  # [T] padded row of every real row; None when nothing is padded

    def spans(self):
        """(expert, padded start, real rows, padded rows) of every non-empty expert."""
        for e, (start, size, padded) in enumerate(zip(self.padded_starts, self.sizes, self.padded_sizes)):
            if size:
                yield e, start, size, padded


def align_groups(group_sizes: torch.Tensor, sizes: list[int], align: int, min_rows: int = 0) -> AlignedGroups:
    """Padded layout of row groups `sizes` (host copy of `group_sizes`), each a multiple of `align`
    and at least `min_rows` long (an empty group then still gets zero rows).

    The destination index is computed on group_sizes' device: real row i of expert e moves by
    (padded start of e) - (start of e). No host sync beyond the caller's one `tolist()`.
    """
    padded_sizes = [max(-(-s // align) * align, min_rows) for s in sizes]
    padded_starts = [0, *accumulate(padded_sizes)][:len(sizes)]
    total, tokens = sum(padded_sizes), sum(sizes)
    dest_rows = None
    if padded_sizes != sizes:
        counts = group_sizes.to(torch.int64)
        padded = ((counts + align - 1) // align * align).clamp_min(min_rows)
        shift = (padded.cumsum(0) - padded) - (counts.cumsum(0) - counts)  # [E]
        dest_rows = torch.arange(tokens, device=counts.device) + \
            torch.repeat_interleave(shift, counts, output_size=tokens)  # [T]
    return AlignedGroups(sizes, padded_sizes, padded_starts, total, dest_rows)


def scatter_to_padded(x: torch.Tensor, groups: AlignedGroups) -> torch.Tensor:
    """x [T, C] -> zero-initialised [T_pad, C] with every row at its padded place (one index op)."""
    if groups.dest_rows is None:
        return x.contiguous()  # nothing to pad (no copy unless x is strided, e.g. an expanded dY)
    return x.new_zeros(groups.total, x.shape[1]).index_copy_(0, groups.dest_rows.to(x.device), x)


def gather_real_rows(outputs: list[torch.Tensor], groups: AlignedGroups, width: int,
                     like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Per-expert GEMM outputs [P_e, width] -> the unpadded [T, width] in one torch.cat."""
    real = [out[:size] for out, (_, _, size, _) in zip(outputs, groups.spans())]
    return torch.cat(real) if real else like.new_zeros(0, width, dtype=dtype)


def take_real_rows(padded: torch.Tensor, groups: AlignedGroups) -> torch.Tensor:
    """A grouped GEMM's [T_pad, width] output -> the unpadded [T, width] in one index_select."""
    return padded if groups.dest_rows is None else padded.index_select(0, groups.dest_rows.to(padded.device))
