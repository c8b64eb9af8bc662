"""Scale selection: current (online) scales and delayed (amax-history) scales.

A scale maps a tensor's range onto the FP8 range: x_fp8 = sat(x * scale), so the ideal scale is
fp8_max / amax(x).

Current scaling computes amax from the tensor being cast, now (one extra read of the tensor):

    scale = fp8_max / amax        if amax is finite and > 0, else 1
    scale = min(scale, FLT_MAX)   (a tiny amax must not produce an infinite scale)
    power_of_2: round the scale DOWN to a power of two by clearing its mantissa bits, so the
                multiply is exact and only the exponent of x changes.

Delayed scaling (Transformer Engine's DelayedScaling) uses the amaxes of EARLIER steps, so the cast
needs no extra pass: the cast of step t uses a scale computed from an amax history and records
amax(x_t) into slot 0 of that history in the same pass. After each optimizer step:

    1. amax = max(history)  (algo "max")  or  history[0]  (algo "most_recent")
    2. scale = fp8_max / amax / 2**margin, ONLY if amax is finite and > 0 (else keep the old one);
       an infinite scale becomes FLT_MAX
    3. history = roll(history, -1); history[0] = 0   (the next step writes its amax there)

A NaN or inf amax therefore never yields a finite-but-wrong scale: the previous scale stays.
"""

from __future__ import annotations

import torch

from fp8train.numerics.formats import FLT_MAX

_EXPONENT_AND_SIGN = -8388608  # 0xFF800000 as int32: keeps sign and exponent, clears the mantissa


def round_down_to_power_of_2(scale: torch.Tensor) -> torch.Tensor:
    """Largest power of two <= scale, exact (bit manipulation, no log2 rounding)."""
    bits = scale.float().contiguous().view(torch.int32) & _EXPONENT_AND_SIGN
    return bits.view(torch.float32)


def scale_from_amax(amax: torch.Tensor, fp8_max: float, power_of_2: bool = False) -> torch.Tensor:
    """Current-scaling rule, elementwise over any shape of amax (per tensor, row, tile, block)."""
    amax = amax.float()
    valid = torch.isfinite(amax) & (amax > 0)
    # A true FP32 division: `python_float / tensor` is computed as reciprocal * float in torch, which
    # is one ulp off for ~1 in 4 amaxes and would disagree with the kernels' reference.
    quotient = torch.full_like(amax, fp8_max) / torch.where(valid, amax, torch.ones_like(amax))
    scale = torch.where(valid, quotient, torch.ones_like(amax))
    scale = scale.clamp(max=FLT_MAX)
    return round_down_to_power_of_2(scale) if power_of_2 else scale


def tensor_amax(x: torch.Tensor, percentile: float | None = None) -> torch.Tensor:
    """max |x| as an FP32 0-d tensor; NaN if x holds a NaN.

    With `percentile` (the seed document's clipping), the amax is that percentile of |x|: values
    above it saturate. Telemetry's `saturated` fraction shows what the clipping costs.
    """
    absx = x.detach().abs().float()
    if percentile is None or percentile >= 100.0:
        amax = absx.amax()
    else:
        flat = absx.reshape(-1)
        k = max(1, min(flat.numel(), int(round(percentile / 100.0 * flat.numel()))))
        amax = flat.kthvalue(k).values
    # amax() propagates NaN, kthvalue may not: make it explicit, without a host sync
    amax = torch.where(torch.isnan(x).any(), torch.full_like(amax, float("nan")), amax)
    return amax


def delayed_scale_update(history: torch.Tensor, scale: torch.Tensor, fp8_max: torch.Tensor,
                         margin: float, algo: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batched reference update for L tensors: history [L, H], scale [L], fp8_max [L].

    Returns (new_history, new_scale, new_scale_inv); inputs are not modified.
    """
    if algo == "max":
        has_nan = torch.isnan(history).any(dim=1)
        amax = torch.where(has_nan, torch.full_like(history[:, 0], float("nan")), history.amax(dim=1))
    elif algo == "most_recent":
        amax = history[:, 0]
    else:
        raise ValueError(f"amax_compute_algo={algo!r}; choose 'max' or 'most_recent'")
    valid = torch.isfinite(amax) & (amax > 0)
    candidate = fp8_max / torch.where(valid, amax, torch.ones_like(amax)) / (2.0 ** margin)
    candidate = torch.where(torch.isinf(candidate), torch.full_like(candidate, FLT_MAX), candidate)
    new_scale = torch.where(valid, candidate, scale)
    new_history = torch.roll(history, shifts=-1, dims=1)
    new_history[:, 0] = 0.0
    return new_history, new_scale, 1.0 / new_scale
