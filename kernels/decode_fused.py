"""Small fused kernels of a decode step: residual add + RMSNorm in one pass over a row.

    residual <- residual + delta          rounded to the residual's dtype (as torch's add would)
    out      <- residual * rsqrt(mean(residual^2) + eps) * weight      FP32 math, out's dtype

(fp8train/models/layers.py RMSNorm computes the same in FP32 from the rounded residual.) One
program per row; a decode step calls it twice per layer, replacing ~10 elementwise launches.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._backend import kernel_backend
from kernels.launcher import next_power_of_2
from kernels.lowbit_triton import store_as, to_bf16, to_f32


@triton.jit
def add_rmsnorm_kernel(res_ptr, delta_ptr, w_ptr, out_ptr, D, eps, HAS_DELTA: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK_D)
    mask = offs < D
    x = to_f32(tl.load(res_ptr + row * D + offs, mask=mask, other=0.0))
    if HAS_DELTA:
        x = x + to_f32(tl.load(delta_ptr + row * D + offs, mask=mask, other=0.0))
        if res_ptr.dtype.element_ty == tl.bfloat16:  # continue from the rounded residual
            x = to_f32(to_bf16(x))
        elif res_ptr.dtype.element_ty != tl.float32:
            x = x.to(res_ptr.dtype.element_ty).to(tl.float32)
        store_as(res_ptr + row * D + offs, x, mask=mask)
    mean_sq = tl.sum(x * x, axis=0) / D
    y = x * (1.0 / tl.sqrt(mean_sq + eps)) * to_f32(tl.load(w_ptr + offs, mask=mask, other=0.0))
    store_as(out_ptr + row * D + offs, y, mask=mask)


def add_rmsnorm(residual: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """In place: residual += delta; returns rmsnorm(residual) * weight ([rows, D], contiguous)."""
    name, reason = kernel_backend(residual)
    if name == "reference":
        raise RuntimeError(f"add_rmsnorm needs Triton for this tensor: {reason}")
    assert residual.is_contiguous() and (delta is None or delta.is_contiguous())
    rows, dim = residual.shape
    out = torch.empty_like(residual)
    add_rmsnorm_kernel[(rows,)](residual, residual if delta is None else delta, weight, out, dim, float(eps),
                                HAS_DELTA=delta is not None, BLOCK_D=next_power_of_2(dim),
                                num_warps=4 if dim <= 4096 else 8)
    return out
