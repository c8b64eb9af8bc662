"""Batched delayed-scaling update in Triton: every FP8 tensor of the model in ONE launch.

Transformer Engine's DelayedScaling keeps, per FP8 tensor, an amax history of H steps (slot 0 is
the current step) and a scale. After each optimizer step, for every tensor:

    amax      = max of the FINITE history entries ("max")  or history[0]  ("most_recent"),
                read before the roll
    scale     = fmax / amax / 2**margin  if amax is finite and > 0, else the previous scale
    scale     = FLT_MAX                  if that (computed or stored) is infinite
    scale_inv = 1 / scale
    history   = roll(history, -1); history[0] = 0

A model has a few hundred such tensors (3 operand roles per linear layer); updating them one by
one costs a few hundred tiny launches per step. Here the L histories are rows of one [L, H] FP32
tensor and a program owns BLOCK_L whole rows, so the update is a single launch. Traffic per
history slot: 4 B read + 4 B written (plus 16 B per tensor for fmax/scale/scale_inv); it is
launch-latency bound in practice.

Non-finite amaxes (NaN, +inf: an overflowed step, or NaN sent as +inf by the all-reduce) are
skipped by "max", so one bad step does not freeze the scale for history_len steps; a non-finite
slot 0 under "most_recent" keeps the old scale. The rule is the core's
(fp8train.quant.scaling.delayed_scale_update), which this kernel matches bit for bit. Finiteness
is tested on the bit patterns (`tl.max` alone may drop or keep NaNs depending on the target).

The roll is in place: each thread loads history[(j + 1) % H] and later stores history[j], which
another thread may still have to read. `tl.debug_barrier()` (a CTA-wide __syncthreads) separates
all loads of the program from its stores; rows never cross programs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.fp8_triton import FLT_MAX, INTERPRETED, finite_positive, ieee_div, reciprocal
from kernels.launcher import LeanKernel, cdiv, next_power_of_2

SLOTS_PER_PROGRAM = 4096  # BLOCK_L * BLOCK_H target


@triton.jit
def _row_amax(rolled, first, mask, MOST_RECENT: tl.constexpr):
    """Per-row amax over the finite entries; `rolled` holds the row's values in rotated order."""
    if MOST_RECENT:
        amax = first
    else:
        finite = (rolled.to(tl.int32, bitcast=True) & 0x7FFFFFFF) < 0x7F800000
        amax = tl.max(tl.where(mask & finite, rolled, 0.0), axis=1)
    return amax


@triton.jit
def _delayed_update_kernel(hist_ptr, scale_ptr, sinv_ptr, fmax_ptr, L, H, margin_div,
                           MOST_RECENT: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_H: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    cols = tl.arange(0, BLOCK_H)
    row_ok = rows < L
    mask = row_ok[:, None] & (cols[None, :] < H)
    row_base = hist_ptr + rows.to(tl.int64)[:, None] * H  # [BLOCK_L, 1]
    rolled = tl.load(row_base + (cols[None, :] + 1) % H, mask=mask, other=0.0)  # history[(j+1) % H]
    first = tl.load(hist_ptr + rows.to(tl.int64) * H, mask=row_ok, other=0.0)  # history[0]
    old_scale = tl.load(scale_ptr + rows, mask=row_ok, other=1.0)
    fmax = tl.load(fmax_ptr + rows, mask=row_ok, other=1.0)
    amax = _row_amax(rolled, first, mask, MOST_RECENT)
    ok = finite_positive(amax)  # false for 0, negative, inf, NaN
    new_scale = ieee_div(ieee_div(fmax, tl.where(ok, amax, 1.0)), tl.zeros_like(fmax) + margin_div)
    new_scale = tl.where(ok, new_scale, old_scale)
    new_scale = tl.where(tl.abs(new_scale) > FLT_MAX, FLT_MAX, new_scale)
    tl.store(scale_ptr + rows, new_scale, mask=row_ok)
    tl.store(sinv_ptr + rows, reciprocal(new_scale), mask=row_ok)
    tl.debug_barrier()  # every load above happens before any history store below
    tl.store(row_base + cols[None, :], tl.where(cols[None, :] == 0, 0.0, rolled), mask=mask)


def delayed_scaling_update(amax_history: torch.Tensor, scale: torch.Tensor, scale_inv: torch.Tensor,
                           fmax: torch.Tensor, margin: float, algo: str) -> None:
    """In place, one launch. Arguments already validated by the caller."""
    L, H = amax_history.shape
    block_h = next_power_of_2(H)
    block_l = min(next_power_of_2(L), max(1, SLOTS_PER_PROGRAM // block_h))
    grid = (cdiv(L, block_l),)
    _UPDATE_LAUNCH(grid, (amax_history, scale, scale_inv, fmax, L, H, float(2.0**margin)),
                   {"MOST_RECENT": algo == "most_recent", "BLOCK_L": block_l, "BLOCK_H": block_h})


_UPDATE_LAUNCH = LeanKernel(_delayed_update_kernel, INTERPRETED)
