"""Fused CUDA quantization (Triton kernels in kernels/) with the pure-torch reference as fallback.

The kernels compute exactly what fp8train.numerics.quantize computes (tests check it bit for bit),
but in one pass over memory: amax + scaled saturating cast (+ the transposed FP8 copy) for
tensorwise scaling, and tile/block scales in the layout the GEMM wants for blockwise scaling.
`FP8TRAIN_KERNELS=0` turns them off (for A/B comparisons).
"""

from __future__ import annotations

import os

import torch

from fp8train.numerics.formats import FP8Format
from fp8train.numerics.quantize import FP8Tensor, quantize_blocks as _ref_blocks, quantize_tensorwise, \
    quantize_tiles as _ref_tiles
from fp8train.numerics.scaling import scale_from_amax, tensor_amax


def _load_kernels():
    if os.environ.get("FP8TRAIN_KERNELS", "1") == "0":
        return None, "disabled by FP8TRAIN_KERNELS=0"
    try:
        import kernels.ops as quant  # noqa: PLC0415 (optional dependency: triton)
        return quant, "triton kernels"
    except Exception as exc:  # triton missing or too old: the torch path is always correct
        return None, f"torch reference ({type(exc).__name__}: {exc})"


KERNELS, KERNELS_REASON = _load_kernels()


def _use_kernels(x: torch.Tensor) -> bool:
    """Triton for contiguous CUDA tensors; everything else takes the pure-torch reference (CPU
    tensors never go through Triton's interpreter here, which is for the kernel tests)."""
    return KERNELS is not None and x.is_cuda and x.is_contiguous()


def cast_with_amax(x: torch.Tensor, scale: torch.Tensor, fmt: FP8Format, need_cols: bool):
    """Delayed tensorwise cast: (rows, cols|None, amax) in one pass where kernels exist."""
    if _use_kernels(x):
        data, data_t, amax = KERNELS.cast_with_amax(x, scale, fmt.dtype, need_cols)
        scale_inv = (1.0 / scale.float()).reshape(())
        rows = FP8Tensor(data, scale_inv, "tensor", fmt)
        cols = FP8Tensor(data_t, scale_inv, "tensor", fmt) if need_cols else None
        return rows, cols, amax
    amax = tensor_amax(x)
    rows = quantize_tensorwise(x, fmt, scale)
    return rows, (rows.t() if need_cols else None), amax


def current_cast(x: torch.Tensor, fmt: FP8Format, power_of_2: bool, need_cols: bool):
    """Current tensorwise cast: (rows, cols|None) with the amax and cast passes in Triton."""
    if _use_kernels(x):
        data, data_t, scale_inv = KERNELS.current_cast(x, fmt.dtype, power_of_2, need_cols)
        scale_inv = scale_inv.reshape(())
        rows = FP8Tensor(data, scale_inv, "tensor", fmt)
        return rows, (FP8Tensor(data_t, scale_inv, "tensor", fmt) if need_cols else None)
    amax = tensor_amax(x)
    rows = quantize_tensorwise(x, fmt, scale_from_amax(amax, fmt.max, power_of_2))
    return rows, (rows.t() if need_cols else None)


def quantize_tiles(x: torch.Tensor, fmt: FP8Format, power_of_2: bool) -> FP8Tensor:
    if _use_kernels(x):
        data, scale_inv = KERNELS.quantize_1x128(x, fmt.dtype, power_of_2)
        return FP8Tensor(data, scale_inv, "tile", fmt)
    return _ref_tiles(x, fmt, power_of_2)


def quantize_tiles_t(x: torch.Tensor, fmt: FP8Format, power_of_2: bool) -> FP8Tensor:
    """1x128 tiles of x^T (128x1 tiles of x), without materialising x^T in high precision."""
    if _use_kernels(x):
        data_t, scale_inv = KERNELS.quantize_1x128_t(x, fmt.dtype, power_of_2)
        return FP8Tensor(data_t, scale_inv, "tile", fmt)
    return _ref_tiles(x.t(), fmt, power_of_2)


def quantize_blocks(x: torch.Tensor, fmt: FP8Format, power_of_2: bool) -> FP8Tensor:
    if _use_kernels(x):
        data, scale_inv = KERNELS.quantize_128x128(x, fmt.dtype, power_of_2)
        return FP8Tensor(data, scale_inv, "block", fmt)
    return _ref_blocks(x, fmt, power_of_2)
