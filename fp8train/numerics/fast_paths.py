"""Fused CUDA quantization (Triton kernels in kernels/) with the pure-torch reference as fallback.

The kernels compute exactly what fp8train.numerics.quantize computes (tests check it bit for bit),
but in one pass over memory: amax + scaled saturating cast (+ the transposed FP8 copy) for
tensorwise scaling, and tile/block scales in the layout the GEMM wants for blockwise scaling.
`FP8TRAIN_KERNELS=0` turns them off (for A/B comparisons).

Under `torch.compile` the casts take one of two routes (`FP8TRAIN_COMPILED_CASTS`):

* `operators`: the kernels' custom operators (`torch.ops.fp8train.*`, kernels/library.py) on any
  device, so Dynamo traces the FP8 layer as one graph and the operators run the same kernels (or,
  off CUDA, the same references) as eager mode;
* `inductor`: the pure-torch reference quantizers are traced instead and Inductor generates (and
  fuses) the cast kernels itself, launched by its own lean wrapper, with no Python per cast;
* `auto` (default): inductor for tensorwise casts, operators for the blockwise ones. Measured on
  the H100 (benchmarks/results/h100_session2/): on the inductor route the tensorwise FP8 state is
  bit-identical to eager and a compiled 125M model trains 2.1x faster than on the operator route;
  the blockwise output did not match eager there (not yet understood), so blockwise stays on the
  verified operators.
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
        import kernels.library  # noqa: F401, PLC0415 (registers torch.ops.fp8train.*)
        import kernels.ops as quant  # noqa: PLC0415 (optional dependency: triton)
        return quant, "triton kernels"
    except Exception as exc:  # triton missing or too old: the torch path is always correct
        return None, f"torch reference ({type(exc).__name__}: {exc})"


KERNELS, KERNELS_REASON = _load_kernels()


COMPILED_CASTS = os.environ.get("FP8TRAIN_COMPILED_CASTS", "auto")
if COMPILED_CASTS not in ("auto", "operators", "inductor"):
    raise ValueError(f"FP8TRAIN_COMPILED_CASTS={COMPILED_CASTS!r}: choose auto, operators or inductor")


def _compiling(blockwise: bool = False) -> bool:
    """Tracing under torch.compile on the custom-operator route (see the module docstring)."""
    route = COMPILED_CASTS if COMPILED_CASTS != "auto" else "operators" if blockwise else "inductor"
    return KERNELS is not None and route == "operators" and torch.compiler.is_compiling()


def _use_kernels(x: torch.Tensor) -> bool:
    """Triton for contiguous CUDA tensors in eager mode; everything else takes the pure-torch
    reference (CPU tensors never go through Triton's interpreter here, which is for the kernel
    tests; a compiled graph on the inductor route traces the reference)."""
    return KERNELS is not None and x.is_cuda and x.is_contiguous() and not torch.compiler.is_compiling()


def delayed_cast(x: torch.Tensor, scale: torch.Tensor, amax_slot: torch.Tensor | None, fmt: FP8Format,
                 need_cols: bool):
    """Delayed tensorwise cast: (rows, cols|None). This cast's amax is max-accumulated into
    `amax_slot` (the caster's history[0:1]) unless it is None. One Triton launch on CUDA."""
    if _compiling():
        data, data_t, amax = torch.ops.fp8train.cast_with_amax(x.contiguous(), scale, fmt.dtype, need_cols)
        if amax_slot is not None:
            record_amax(amax_slot, amax)
        return _tensorwise_pair(data, data_t, torch.div(torch.ones_like(scale), scale), fmt, need_cols)
    if _use_kernels(x):
        return _tensorwise_pair(*KERNELS.delayed_cast(x, scale, amax_slot, fmt.dtype, need_cols), fmt, need_cols)
    rows = quantize_tensorwise(x, fmt, scale)
    if amax_slot is not None:
        record_amax(amax_slot, tensor_amax(x))
    return rows, (rows.t() if need_cols else None)


@torch.no_grad()
def record_amax(amax_slot: torch.Tensor, amax: torch.Tensor) -> None:
    """history[0] = max(history[0], amax); NaN propagates so the update keeps the old scale."""
    amax_slot.copy_(torch.maximum(amax_slot, amax.reshape(1).float()))


def current_cast(x: torch.Tensor, fmt: FP8Format, power_of_2: bool, need_cols: bool):
    """Current tensorwise cast: (rows, cols|None) with the amax and cast passes in Triton."""
    if _compiling():
        data, data_t, scale_inv = torch.ops.fp8train.current_cast(x.contiguous(), fmt.dtype, power_of_2, need_cols)
        return _tensorwise_pair(data, data_t, scale_inv, fmt, need_cols)
    if _use_kernels(x):
        return _tensorwise_pair(*KERNELS.current_cast(x, fmt.dtype, power_of_2, need_cols), fmt, need_cols)
    amax = tensor_amax(x)
    rows = quantize_tensorwise(x, fmt, scale_from_amax(amax, fmt.max, power_of_2))
    return rows, (rows.t() if need_cols else None)


def _tensorwise_pair(data, data_t, scale_inv, fmt: FP8Format, need_cols: bool):
    scale_inv = scale_inv.reshape(())
    rows = FP8Tensor(data, scale_inv, "tensor", fmt)
    return rows, (FP8Tensor(data_t, scale_inv, "tensor", fmt) if need_cols else None)


def _blockwise_outputs(op_name: str, x: torch.Tensor, fmt: FP8Format, power_of_2: bool):
    """kernels.<op_name>'s outputs (its custom operator while compiling), or None off CUDA."""
    if _compiling(blockwise=True):
        return getattr(torch.ops.fp8train, op_name)(x.contiguous(), fmt.dtype, power_of_2)
    if _use_kernels(x):
        return getattr(KERNELS, op_name)(x, fmt.dtype, power_of_2)
    return None


def _blockwise(op_name: str, granularity: str, x: torch.Tensor, fmt: FP8Format, power_of_2: bool,
               reference) -> FP8Tensor:
    """One operand from kernels.<op_name>, or `reference()` off CUDA."""
    outputs = _blockwise_outputs(op_name, x, fmt, power_of_2)
    if outputs is None:
        return reference()
    data, scale_inv = outputs
    return FP8Tensor(data, scale_inv, granularity, fmt)


def quantize_tiles(x: torch.Tensor, fmt: FP8Format, power_of_2: bool) -> FP8Tensor:
    """1x128 tiles along the last dimension (DeepSeek-V3 activations and gradients)."""
    return _blockwise("quantize_1x128", "tile", x, fmt, power_of_2, lambda: _ref_tiles(x, fmt, power_of_2))


def quantize_tiles_t(x: torch.Tensor, fmt: FP8Format, power_of_2: bool) -> FP8Tensor:
    """1x128 tiles of x^T (128x1 tiles of x), without materialising x^T in high precision."""
    return _blockwise("quantize_1x128_t", "tile", x, fmt, power_of_2, lambda: _ref_tiles(x.t(), fmt, power_of_2))


def quantize_blocks(x: torch.Tensor, fmt: FP8Format, power_of_2: bool) -> FP8Tensor:
    """128x128 blocks (DeepSeek-V3 weights)."""
    return _blockwise("quantize_128x128", "block", x, fmt, power_of_2, lambda: _ref_blocks(x, fmt, power_of_2))


def _blockwise_pair(op_name: str, granularity: str, x: torch.Tensor, fmt: FP8Format, power_of_2: bool,
                    reference) -> tuple[FP8Tensor, FP8Tensor]:
    """Like `_blockwise` for the ops that return both operands from one read of x: (rows, cols)."""
    outputs = _blockwise_outputs(op_name, x, fmt, power_of_2)
    if outputs is None:
        return reference()
    data, scale_inv, data_t, scale_inv_t = outputs
    return FP8Tensor(data, scale_inv, granularity, fmt), FP8Tensor(data_t, scale_inv_t, granularity, fmt)


def quantize_tiles_both(x: torch.Tensor, fmt: FP8Format, power_of_2: bool) -> tuple[FP8Tensor, FP8Tensor]:
    """quantize_tiles(x) and quantize_tiles_t(x), bit for bit and in the same layouts, from one
    read of x on CUDA. On the H100 the fused launch takes 0.51 ms for 16384x16384 bf16 against
    0.58 ms for the two single-operand launches (benchmarks/results/h100_session3/bench_quant.txt)."""
    return _blockwise_pair("quantize_1x128_both", "tile", x, fmt, power_of_2,
                           lambda: (_ref_tiles(x, fmt, power_of_2), _ref_tiles(x.t(), fmt, power_of_2)))


def quantize_blocks_both(x: torch.Tensor, fmt: FP8Format, power_of_2: bool) -> tuple[FP8Tensor, FP8Tensor]:
    """quantize_blocks(x) and its transpose `.t()`: the kernel writes the transposed FP8 copy in
    the same pass, instead of a separate (uncoalesced, 1-byte) torch transpose."""
    def reference():
        rows = _ref_blocks(x, fmt, power_of_2)
        return rows, rows.t()

    return _blockwise_pair("quantize_128x128_both", "block", x, fmt, power_of_2, reference)
