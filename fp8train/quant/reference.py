"""The reference quantizers: every cast of the project, written once in pure torch.

These functions define the numerics. The Triton kernels in kernels/ (FP8 casts, the delayed
update, PTQ and KV-cache kernels) are tested bit for bit against them; FP8 training, PTQ, the KV
cache and QAT call them (or a kernel that matches them).

    float formats  codes = clamp(x * scale, -fmax, fmax).to(fp8)   FP32 multiply, round to nearest
                   even in the conversion; NaN stays NaN (its FP8 sign is not specified: CPUs keep
                   it, NVIDIA GPUs return a positive canonical NaN)
    int formats    codes = clamp(round(x / step) + zero, qmin, qmax)   round half to even

`quantize(x, fmt, granularity)` picks the scales from x itself (CURRENT scaling; symmetric or
asymmetric integer grids); `quantize_with_scale` / `quantize_with_step` take given ones (DELAYED
and STATIC scaling, GPTQ's column-by-column grid).
"""

from __future__ import annotations

import torch

from fp8train.quant.formats import NumberFormat
from fp8train.quant.granularity import Granularity, GranularityKind
from fp8train.quant.scaling import group_amax, group_range, int_grid, reciprocal, scale_from_amax
from fp8train.quant.tensor import QuantizedTensor


def saturating_cast(x_scaled: torch.Tensor, fmt: NumberFormat) -> torch.Tensor:
    """Clamp an already-scaled tensor to +-fmt.max and cast it (float formats)."""
    return x_scaled.clamp(-fmt.max, fmt.max).to(fmt.dtype)


def float_codes(x: torch.Tensor, scale: torch.Tensor, fmt: NumberFormat) -> torch.Tensor:
    """FP8 codes of x * scale (the multiply in FP32; scale broadcasts)."""
    return saturating_cast(x.float() * scale, fmt)


def int_codes(x: torch.Tensor, step: torch.Tensor, zero: torch.Tensor | None, fmt: NumberFormat,
              symmetric_clip: bool = True) -> torch.Tensor:
    """Integer codes clamp(round(x / step) + zero, qmin, qmax), stored in fmt.dtype.

    With no zero point and `symmetric_clip`, the range is -qmax..qmax (a symmetric grid)."""
    q = torch.round(torch.div(x.float(), step))
    if zero is not None:
        q = q + zero
    low = -fmt.max if zero is None and symmetric_clip else fmt.min
    return q.clamp(low, fmt.max).to(fmt.dtype)


def quantize_with_scale(x: torch.Tensor, fmt: NumberFormat, scale: torch.Tensor,
                        granularity: Granularity) -> QuantizedTensor:
    """Float codes with a given (encode) scale of `granularity.scale_shape` (DELAYED/STATIC)."""
    rows, cols = x.shape
    granularity.check_shape(rows, cols)
    scale = scale.float().reshape(granularity.scale_shape(rows, cols))
    data = float_codes(granularity.grouped(x), granularity.per_group(scale), fmt).reshape(rows, cols)
    return QuantizedTensor(data.contiguous(), reciprocal(scale), granularity, fmt)


def quantize_with_step(x: torch.Tensor, fmt: NumberFormat, step: torch.Tensor, zero: torch.Tensor | None,
                       granularity: Granularity) -> QuantizedTensor:
    """Integer codes with a given step (and zero point) of `granularity.scale_shape` (STATIC, GPTQ)."""
    rows, cols = x.shape
    granularity.check_shape(rows, cols)
    shape = granularity.scale_shape(rows, cols)
    step = step.float().reshape(shape)
    zero = None if zero is None else zero.float().reshape(shape)
    per = granularity.per_group
    data = int_codes(granularity.grouped(x), per(step), None if zero is None else per(zero), fmt)
    return QuantizedTensor(data.reshape(rows, cols).contiguous(), step, granularity, fmt,
                           None if zero is None else zero.to(fmt.dtype))


def quantize(x: torch.Tensor, fmt: NumberFormat, granularity: Granularity, *, power_of_2: bool = False,
             symmetric: bool = True) -> QuantizedTensor:
    """CURRENT scaling: scales from x's own groups (amax for floats, range for integers).

    x [R, C] (any float dtype); C is the contraction dimension and TILE groups run along it."""
    if x.dim() != 2:
        raise ValueError(f"quantize expects a 2-D tensor [R, C], got shape {tuple(x.shape)}")
    rows, cols = x.shape
    granularity.check_shape(rows, cols)
    if fmt.is_float:
        scale = scale_from_amax(group_amax(x, granularity), fmt.max, power_of_2)
        return quantize_with_scale(x, fmt, scale, granularity)
    if power_of_2:
        raise ValueError("power_of_2 scales apply to float (FP8) formats only")
    step, zero = int_grid(*group_range(x, granularity), fmt, symmetric)
    return quantize_with_step(x, fmt, step, zero, granularity)


def fake_quantize(x: torch.Tensor, fmt: NumberFormat, granularity: Granularity, **options) -> torch.Tensor:
    """quantize then dequantize, in x's dtype (QAT forward, PTQ error measurement)."""
    return quantize(x, fmt, granularity, **options).dequantize().to(x.dtype)


def quantize_transposed(x: torch.Tensor, fmt: NumberFormat, granularity: Granularity,
                        power_of_2: bool = False) -> QuantizedTensor:
    """The operand of the transposed GEMM: re-quantized for ROW/TILE, same codes for TENSOR/BLOCK."""
    if granularity.transposable:
        return quantize(x, fmt, granularity, power_of_2=power_of_2).t()
    return quantize(x.t(), fmt, granularity, power_of_2=power_of_2)


def is_tensorwise(granularity: Granularity) -> bool:
    return granularity.kind is GranularityKind.TENSOR
