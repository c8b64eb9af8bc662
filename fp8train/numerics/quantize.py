"""Quantized operands: FP8 data plus the scales that decode it, in GEMM-ready orientation.

Every GEMM here is written in one "NT" form, out[M, N] = A[M, K] @ B[N, K]^T, with BOTH operands
stored row-major along the contraction dimension K. An `FP8Tensor` is such an operand:

    data       [R, C] FP8, contiguous, C is the GEMM's inner (contraction) dimension
    scale_inv  FP32 decode factors (x ~= data * scale_inv), by granularity:
               "tensor"      []                 one scale
               "row"         [R, 1]             one per row (along C)
               "tile"        [R, C/128]         one per 1x128 tile (DeepSeek-V3 activations)
               "block"       [R/128, C/128]     one per 128x128 block (DeepSeek-V3 weights)

The pure-torch quantizers below are the reference semantics; kernels/ has Triton versions that
must match them bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fp8train.numerics.formats import FP8Format, quantize_with_scale
from fp8train.numerics.scaling import scale_from_amax

BLOCK = 128


@dataclass
class FP8Tensor:
    """FP8 data [R, C] (contraction along C) and its FP32 decode scales."""

    data: torch.Tensor
    scale_inv: torch.Tensor
    granularity: str
    fmt: FP8Format

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    def expanded_scale_inv(self) -> torch.Tensor:
        """scale_inv broadcast to data's shape (for dequantization and telemetry)."""
        rows, cols = self.data.shape
        s = self.scale_inv
        if self.granularity == "tensor":
            return s.reshape(1, 1).expand(rows, cols)
        if self.granularity == "row":
            return s.reshape(rows, 1).expand(rows, cols)
        if self.granularity == "tile":
            return s.reshape(rows, cols // BLOCK).repeat_interleave(BLOCK, dim=1)
        if self.granularity == "block":
            grid = s.reshape(rows // BLOCK, cols // BLOCK)
            return grid.repeat_interleave(BLOCK, dim=0).repeat_interleave(BLOCK, dim=1)
        raise AssertionError(f"unknown granularity {self.granularity}")

    def dequantize(self) -> torch.Tensor:
        """FP32 values the FP8 data stands for."""
        return self.data.float() * self.expanded_scale_inv()

    def t(self) -> "FP8Tensor":
        """The transposed operand, reusing the same FP8 values (tensorwise and 128x128 blocks only).

        A 128x128 block of W is a 128x128 block of W^T, so DeepSeek-V3's weight quantization serves
        both the forward and the grad_input GEMM without re-quantizing.
        """
        if self.granularity == "tensor":
            return FP8Tensor(self.data.t().contiguous(), self.scale_inv, "tensor", self.fmt)
        if self.granularity == "block":
            return FP8Tensor(self.data.t().contiguous(), self.scale_inv.t().contiguous(), "block", self.fmt)
        raise ValueError(f"a {self.granularity}-scaled operand cannot be transposed without re-quantizing")


def check_multiple(dim: int, what: str, multiple: int = BLOCK) -> None:
    if dim % multiple:
        raise ValueError(f"{what}={dim} is not a multiple of {multiple}, which blockwise scaling needs; "
                         f"pad it (recipe padding: zero) or choose a size divisible by {multiple}")


def quantize_tensorwise(x: torch.Tensor, fmt: FP8Format, scale: torch.Tensor) -> FP8Tensor:
    """One scale for the whole tensor (delayed or current)."""
    scale = scale.float().reshape(())
    return FP8Tensor(quantize_with_scale(x, scale, fmt).contiguous(), (1.0 / scale), "tensor", fmt)


def quantize_rowwise(x: torch.Tensor, fmt: FP8Format, power_of_2: bool = False) -> FP8Tensor:
    """One current scale per row of x [R, C]."""
    amax = x.detach().abs().float().amax(dim=1, keepdim=True)  # [R, 1]
    amax = torch.where(torch.isnan(x).any(dim=1, keepdim=True), torch.full_like(amax, float("nan")), amax)
    scale = scale_from_amax(amax, fmt.max, power_of_2)
    return FP8Tensor(quantize_with_scale(x, scale, fmt).contiguous(), 1.0 / scale, "row", fmt)


def _grouped_amax(groups: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    amax = groups.abs().float().amax(dim=dims)
    has_nan = torch.isnan(groups).to(torch.uint8).amax(dim=dims).bool()
    return torch.where(has_nan, torch.full_like(amax, float("nan")), amax)


def quantize_tiles(x: torch.Tensor, fmt: FP8Format, power_of_2: bool = False) -> FP8Tensor:
    """One current scale per 1x128 tile of x [R, C] (C % 128 == 0)."""
    rows, cols = x.shape
    check_multiple(cols, "inner dimension")
    tiles = x.detach().reshape(rows, cols // BLOCK, BLOCK)  # [R, C/128, 128]
    scale = scale_from_amax(_grouped_amax(tiles, (2,)), fmt.max, power_of_2)  # [R, C/128]
    data = quantize_with_scale(x.reshape(rows, cols // BLOCK, BLOCK), scale.unsqueeze(-1), fmt)
    return FP8Tensor(data.reshape(rows, cols).contiguous(), 1.0 / scale, "tile", fmt)


def quantize_blocks(x: torch.Tensor, fmt: FP8Format, power_of_2: bool = False) -> FP8Tensor:
    """One current scale per 128x128 block of x [R, C] (both multiples of 128)."""
    rows, cols = x.shape
    check_multiple(rows, "outer dimension")
    check_multiple(cols, "inner dimension")
    blocks = x.detach().reshape(rows // BLOCK, BLOCK, cols // BLOCK, BLOCK)  # [R/128, 128, C/128, 128]
    scale = scale_from_amax(_grouped_amax(blocks, (1, 3)), fmt.max, power_of_2)  # [R/128, C/128]
    data = quantize_with_scale(x.reshape(rows // BLOCK, BLOCK, cols // BLOCK, BLOCK),
                               scale[:, None, :, None], fmt)
    return FP8Tensor(data.reshape(rows, cols).contiguous(), 1.0 / scale, "block", fmt)
