"""Granularity: which elements of a 2-D tensor share one scale.

Every quantized operand is a matrix x [R, C] whose LAST dimension C is the one a GEMM contracts
(weights: [out, in]; activations: [tokens, features]). Four kinds, one vocabulary for FP8
training, PTQ and the KV cache:

| kind   | one scale per         | scale shape        | used by                                        |
|--------|-----------------------|--------------------|------------------------------------------------|
| TENSOR | the whole tensor      | []                 | delayed / current FP8, static activations      |
| ROW    | row (along C)         | [R, 1]             | rowwise FP8, INT8 per channel, per-token acts  |
| TILE   | 1 x G tile of a row   | [R, C/G]           | DeepSeek-V3 1x128 activations, INT4 g128/g32   |
| BLOCK  | G x G block           | [R/G, C/G]         | DeepSeek-V3 128x128 weights                    |

A TENSOR or BLOCK scale also fits the transposed matrix (a G x G block of W is one of W^T), so the
transposed FP8 copy a backward GEMM needs can reuse the same codes; ROW and TILE scales run along
C only, so the transpose must be quantized again (its groups run the other way).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch


class GranularityKind(Enum):
    TENSOR = "tensor"
    ROW = "row"
    TILE = "tile"
    BLOCK = "block"


@dataclass(frozen=True)
class Granularity:
    """A kind plus, for TILE and BLOCK, the group edge G (DeepSeek-V3: 128; INT4 groups: 32-128)."""

    kind: GranularityKind
    size: int = 0

    @staticmethod
    def tensor() -> "Granularity":
        return Granularity(GranularityKind.TENSOR)

    @staticmethod
    def row() -> "Granularity":
        return Granularity(GranularityKind.ROW)

    @staticmethod
    def tile(size: int = 128) -> "Granularity":
        return Granularity(GranularityKind.TILE, size)

    @staticmethod
    def block(size: int = 128) -> "Granularity":
        return Granularity(GranularityKind.BLOCK, size)

    def __post_init__(self):
        grouped = self.kind in (GranularityKind.TILE, GranularityKind.BLOCK)
        if grouped and (not isinstance(self.size, int) or self.size < 1):
            raise ValueError(f"{self.kind.value} granularity needs a group size >= 1, got {self.size!r}")

    def __repr__(self) -> str:
        if self.kind is GranularityKind.TILE:
            return f"tile(1x{self.size})"
        if self.kind is GranularityKind.BLOCK:
            return f"block({self.size}x{self.size})"
        return self.kind.value

    @property
    def transposable(self) -> bool:
        """Do the same scales fit the transposed matrix (no re-quantization for x^T)?"""
        return self.kind in (GranularityKind.TENSOR, GranularityKind.BLOCK)

    def check_shape(self, rows: int, cols: int, what: str = "tensor") -> None:
        """ValueError naming the dimension unless [rows, cols] splits into whole groups."""
        g = self.size
        if self.kind is GranularityKind.BLOCK and rows % g:
            raise ValueError(f"{what}: outer dimension={rows} is not a multiple of {g}, which {self!r} "
                             f"scaling needs; pad it or choose a size divisible by {g}")
        if self.kind in (GranularityKind.TILE, GranularityKind.BLOCK) and cols % g:
            raise ValueError(f"{what}: inner dimension={cols} is not a multiple of {g}, which {self!r} "
                             f"scaling needs; pad it or choose a size divisible by {g}")

    def scale_shape(self, rows: int, cols: int) -> tuple[int, ...]:
        g, kind = self.size, self.kind
        if kind is GranularityKind.TENSOR:
            return ()
        if kind is GranularityKind.ROW:
            return (rows, 1)
        if kind is GranularityKind.TILE:
            return (rows, cols // g)
        return (rows // g, cols // g)

    def grouped(self, x: torch.Tensor) -> torch.Tensor:
        """x [R, C] as a view whose group elements sit on `group_dims` (see below)."""
        rows, cols = x.shape
        g = self.size
        if self.kind is GranularityKind.TILE:
            return x.reshape(rows, cols // g, g)  # [R, C/G, G]
        if self.kind is GranularityKind.BLOCK:
            return x.reshape(rows // g, g, cols // g, g)  # [R/G, G, C/G, G]
        return x

    @property
    def group_dims(self) -> tuple[int, ...]:
        """Dimensions of `grouped(x)` that one scale covers."""
        return {GranularityKind.TENSOR: (0, 1), GranularityKind.ROW: (1,),
                GranularityKind.TILE: (2,), GranularityKind.BLOCK: (1, 3)}[self.kind]

    def per_group(self, scale: torch.Tensor) -> torch.Tensor:
        """A scale of `scale_shape` reshaped to broadcast against `grouped(x)`."""
        if self.kind is GranularityKind.TILE:
            return scale.unsqueeze(-1)  # [R, C/G, 1]
        if self.kind is GranularityKind.BLOCK:
            return scale[:, None, :, None]  # [R/G, 1, C/G, 1]
        return scale

    def expand(self, scale: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        """A scale of `scale_shape(rows, cols)` broadcast to the full [rows, cols]."""
        g = self.size
        if self.kind is GranularityKind.TENSOR:
            return scale.reshape(1, 1).expand(rows, cols)
        if self.kind is GranularityKind.ROW:
            return scale.reshape(rows, 1).expand(rows, cols)
        if self.kind is GranularityKind.TILE:
            return scale.reshape(rows, cols // g).repeat_interleave(g, dim=1)
        grid = scale.reshape(rows // g, cols // g)
        return grid.repeat_interleave(g, dim=0).repeat_interleave(g, dim=1)

    def transposed_scale(self, scale: torch.Tensor) -> torch.Tensor:
        """The scale of x^T for transposable granularities (same codes, transposed grid)."""
        if self.kind is GranularityKind.TENSOR:
            return scale
        if self.kind is GranularityKind.BLOCK:
            return scale.t().contiguous()
        raise ValueError(f"a {self!r}-scaled operand cannot be transposed without re-quantizing")


TENSOR, ROW = Granularity.tensor(), Granularity.row()
