"""Scale rules: how a group's range becomes the factor that maps it onto a format's codes.

Two conventions, one per format kind, each the one its field uses:

* Float (FP8) formats multiply: x_q = sat(x * scale), x ~= x_q * scale_inv, scale_inv = 1 / scale.
  The ideal scale is fmax / amax (Transformer Engine, DeepSeek-V3).
* Integer formats divide by a step: q = clamp(round(x / step) + zero, qmin, qmax),
  x ~= (q - zero) * step. The step is what `QuantizedTensor.scale_inv` stores for integers, so
  dequantization is one rule for every format: (codes - zero) * scale_inv. `round` is
  round-half-to-even (torch.round), as in GPTQ's reference code.

How the scale is chosen (`ScalingMode`):

    CURRENT  from the group's own amax, now (online): fmax / amax if amax is finite and > 0,
             else 1; an infinite quotient becomes FLT_MAX; `power_of_2` rounds the scale DOWN to a
             power of two by clearing its mantissa bits (exact: only exponents change).
    DELAYED  from an amax HISTORY of earlier steps (Transformer Engine's DelayedScaling), so the
             cast needs no extra pass over the tensor. After each optimizer step:
               1. amax = max of the FINITE history entries ("max") or history[0] ("most_recent")
               2. scale = fmax / amax / 2**margin if amax is finite and > 0, else the old scale
               3. a scale that is infinite (stored or computed) becomes FLT_MAX
               4. history = roll(history, -1); history[0] = 0
             A non-finite amax (an overflowed or NaN activation, or NaN sent as +inf by the
             all-reduce) is skipped in step 1 rather than poisoning the max for history_len
             steps: TE's CUDA kernel behaves the same way (its max ignores NaN); TE's PyTorch
             fallback instead freezes the scale until the NaN rolls out (1024 steps for HYBRID).
    STATIC   a scale fixed ahead of time (post-training calibration).

Beware: `python_float / tensor` in torch computes `tensor.reciprocal() * python_float`, which is
not a correctly rounded division (one ulp off for ~1 in 4 amaxes). Every division here divides a
tensor by a tensor.
"""

from __future__ import annotations

from enum import Enum

import torch

from fp8train.quant.formats import FLT_MAX, NumberFormat
from fp8train.quant.granularity import Granularity, GranularityKind

_EXPONENT_AND_SIGN = -8388608  # 0xFF800000 as int32: keeps sign and exponent, clears the mantissa
DELAYED_ALGOS = ("max", "most_recent")


class ScalingMode(Enum):
    DELAYED = "delayed"
    CURRENT = "current"
    STATIC = "static"


def round_down_to_power_of_2(scale: torch.Tensor) -> torch.Tensor:
    """Largest power of two <= scale, exact (bit manipulation, no log2 rounding)."""
    bits = scale.float().contiguous().view(torch.int32) & _EXPONENT_AND_SIGN
    return bits.view(torch.float32)


def reciprocal(scale: torch.Tensor) -> torch.Tensor:
    """1 / scale as a correctly rounded FP32 division."""
    return torch.div(torch.ones_like(scale), scale)


def scale_from_amax(amax: torch.Tensor, fmax: float, power_of_2: bool = False) -> torch.Tensor:
    """CURRENT rule for float formats, elementwise over any shape of amax (tensor/row/tile/block)."""
    amax = amax.float()
    valid = torch.isfinite(amax) & (amax > 0)
    quotient = torch.full_like(amax, fmax) / torch.where(valid, amax, torch.ones_like(amax))
    scale = torch.where(valid, quotient, torch.ones_like(amax)).clamp(max=FLT_MAX)
    return round_down_to_power_of_2(scale) if power_of_2 else scale


def tensor_amax(x: torch.Tensor, percentile: float | None = None) -> torch.Tensor:
    """max |x| as an FP32 0-d tensor; NaN if x holds a NaN.

    With `percentile` (percentile clipping), the amax is that percentile of |x|: values above it
    saturate; the FP8 telemetry's `saturated` fraction shows what the clipping costs.
    """
    absx = x.detach().abs().float()
    if percentile is None or percentile >= 100.0:
        amax = absx.amax()
    else:
        flat = absx.reshape(-1)
        k = max(1, min(flat.numel(), int(round(percentile / 100.0 * flat.numel()))))
        amax = flat.kthvalue(k).values
    # amax() propagates NaN, kthvalue may not: make it explicit, without a host sync
    return torch.where(torch.isnan(x).any(), torch.full_like(amax, float("nan")), amax)


def group_amax(x: torch.Tensor, granularity: Granularity) -> torch.Tensor:
    """FP32 max |x| per group of x [R, C] (shape `granularity.scale_shape`); NaN if a group has one."""
    if granularity.kind is GranularityKind.TENSOR:
        return tensor_amax(x)
    groups = granularity.grouped(x.detach())
    dims = granularity.group_dims
    amax = groups.abs().float().amax(dim=dims, keepdim=granularity.kind is GranularityKind.ROW)
    has_nan = torch.isnan(groups).to(torch.uint8).amax(dim=dims, keepdim=granularity.kind is GranularityKind.ROW)
    return torch.where(has_nan.bool(), torch.full_like(amax, float("nan")), amax)


def group_range(x: torch.Tensor, granularity: Granularity) -> tuple[torch.Tensor, torch.Tensor]:
    """FP32 (min, max) per group, each widened to include 0 (so 0 is exactly representable)."""
    groups = granularity.grouped(x.detach().float())
    dims, keep = granularity.group_dims, granularity.kind is GranularityKind.ROW
    if granularity.kind is GranularityKind.TENSOR:
        lo, hi = groups.amin(), groups.amax()
    else:
        lo, hi = groups.amin(dim=dims, keepdim=keep), groups.amax(dim=dims, keepdim=keep)
    return lo.clamp(max=0.0), hi.clamp(min=0.0)


def int_grid(lo: torch.Tensor, hi: torch.Tensor, fmt: NumberFormat,
             symmetric: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(step, zero point or None) for integer codes covering [lo, hi] elementwise.

    symmetric (signed formats): codes -qmax..qmax, step = max(|lo|, |hi|) / qmax, no zero point
        (INT8: +-127, INT4: +-7; the most negative code -qmax-1 stays unused so the grid is
        symmetric around an exact 0).
    asymmetric (unsigned formats): codes 0..qmax, step = (hi - lo) / qmax,
        zero = clamp(round(-lo / step), 0, qmax), an integer code: x ~= (q - zero) * step
        (GPTQ's and AWQ's convention; compressed-tensors stores the same grid shifted to signed).
    An all-zero group gets step 1 (its codes are all `zero`, which decodes to 0 exactly).
    """
    if fmt.is_float:
        raise ValueError(f"int_grid needs an integer format, got {fmt!r}")
    if symmetric:
        if not fmt.signed:
            raise ValueError(f"symmetric integer grids need a signed format (int8/int4), got {fmt!r}")
        amax = torch.maximum(lo.abs(), hi.abs())
        step = torch.div(amax, torch.full_like(amax, fmt.max))
        return torch.where(step > 0, step, torch.ones_like(step)), None
    if fmt.signed:
        raise ValueError(f"asymmetric integer grids need an unsigned format (uint8/uint4), got {fmt!r}")
    step = torch.div(hi - lo, torch.full_like(hi, fmt.max))
    step = torch.where(step > 0, step, torch.ones_like(step))
    zero = torch.round(torch.div(-lo, step)).clamp(fmt.min, fmt.max)
    return step, zero


def delayed_scale_update(history: torch.Tensor, scale: torch.Tensor, fmax: torch.Tensor,
                         margin: float, algo: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DELAYED rule for L tensors at once: history [L, H], scale [L], fmax [L] (FP32).

    Returns (new_history, new_scale, new_scale_inv); the inputs are not modified. The Triton kernel
    (kernels/delayed.py) must match this bit for bit.
    """
    if algo not in DELAYED_ALGOS:
        raise ValueError(f"amax_compute_algo={algo!r}; choose one of {list(DELAYED_ALGOS)}")
    if algo == "max":
        finite = torch.isfinite(history)
        amax = torch.where(finite, history, torch.zeros_like(history)).amax(dim=1)
    else:
        amax = history[:, 0]
    valid = torch.isfinite(amax) & (amax > 0)
    divisor = torch.full_like(amax, 2.0 ** margin)
    candidate = torch.div(torch.div(fmax, torch.where(valid, amax, torch.ones_like(amax))), divisor)
    new_scale = torch.where(valid, candidate, scale)
    new_scale = torch.where(torch.isinf(new_scale), torch.full_like(new_scale, FLT_MAX), new_scale)
    new_history = torch.roll(history, shifts=-1, dims=1)
    new_history[:, 0] = 0.0
    return new_history, new_scale, reciprocal(new_scale)


def count_nonfinite_current_amax(history: torch.Tensor) -> torch.Tensor:
    """How many of the L tensors recorded a non-finite amax this step (slot 0), as a 0-d tensor."""
    return (~torch.isfinite(history[:, 0])).sum()
