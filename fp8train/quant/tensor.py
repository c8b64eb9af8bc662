"""QuantizedTensor: codes plus the factors that decode them, for every format and granularity.

    data        [R, C] codes (FP8 values, or integers one per byte), C the GEMM's contraction dim
    scale_inv   FP32 decode factors of `granularity.scale_shape(R, C)`
    zero_point  integer formats with an asymmetric grid only: codes that decode to 0, same shape
    x ~= (data - zero_point) * scale_inv     (no zero point: data * scale_inv)

GEMMs here are written in one "NT" form, out[M, N] = A[M, K] @ B[N, K]^T, so an operand is
stored row-major along K and `t()` gives the operand of the transposed GEMM where the
granularity allows it (tensor and block scales; see granularity.py).

`data` is contiguous except for the column views of the MoE padded layout (`cols`), which
torch._scaled_mm accepts as they are (leading dimension = the row stride).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fp8train.quant.formats import NumberFormat
from fp8train.quant.granularity import Granularity, GranularityKind


@dataclass
class QuantizedTensor:
    """Codes [R, C] and their FP32 decode factors (plus an integer zero point where asymmetric)."""

    data: torch.Tensor
    scale_inv: torch.Tensor
    granularity: Granularity
    fmt: NumberFormat
    zero_point: torch.Tensor | None = None

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    @property
    def kind(self) -> GranularityKind:
        return self.granularity.kind

    def expanded_scale_inv(self) -> torch.Tensor:
        """scale_inv broadcast to data's shape (dequantization, telemetry)."""
        rows, cols = self.data.shape
        return self.granularity.expand(self.scale_inv, rows, cols)

    def dequantize(self) -> torch.Tensor:
        """FP32 values the codes stand for."""
        codes = self.data.float()
        if self.zero_point is not None:
            rows, cols = self.data.shape
            codes = codes - self.granularity.expand(self.zero_point.float(), rows, cols)
        return codes * self.expanded_scale_inv()

    def t(self) -> "QuantizedTensor":
        """The transposed operand with the same codes (tensor and block scales only).

        A 128x128 block of W is a 128x128 block of W^T, so DeepSeek-V3's weight quantization serves
        both the forward and the grad_input GEMM without re-quantizing."""
        zero = None if self.zero_point is None else self.granularity.transposed_scale(self.zero_point)
        return QuantizedTensor(self.data.t().contiguous(), self.granularity.transposed_scale(self.scale_inv),
                               self.granularity, self.fmt, zero)

    def rows(self, start: int, size: int) -> "QuantizedTensor":
        """Rows [start, start + size) as views (block scales need block-aligned bounds)."""
        kind, scale = self.kind, self.scale_inv
        if kind in (GranularityKind.ROW, GranularityKind.TILE):
            scale = scale[start:start + size]
        elif kind is GranularityKind.BLOCK:
            g = self.granularity.size
            assert start % g == 0 and size % g == 0, "block slices must be block aligned"
            scale = scale[start // g:(start + size) // g]
        return QuantizedTensor(self.data[start:start + size], scale, self.granularity, self.fmt)

    def cols(self, start: int, size: int) -> "QuantizedTensor":
        """Columns [start, start + size) as views (tensor scales, or tile-aligned tile scales)."""
        kind, scale = self.kind, self.scale_inv
        if kind is GranularityKind.TILE:
            g = self.granularity.size
            assert start % g == 0 and size % g == 0, f"tile column slices must be {g}-aligned"
            scale = scale[:, start // g:(start + size) // g]
        else:
            assert kind is GranularityKind.TENSOR, f"column slices need tensor or tile scales, got {self.granularity!r}"
        return QuantizedTensor(self.data[:, start:start + size], scale, self.granularity, self.fmt)
