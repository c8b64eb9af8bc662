"""QuantSpec: one quantizer written as data, shared by PTQ presets, QAT presets and the KV cache.

    weight: {format: uint4, granularity: tile, group_size: 128, symmetric: false}   # INT4 g128 asym
    weight: {format: int8, granularity: row}                                          # INT8 per channel
    input:  {format: int8, granularity: row, dynamic: true}                           # per-token A8
    weight: {format: e4m3, granularity: block, group_size: 128}                       # DeepSeek-V3 FP8

`granularity` is one of tensor | row | tile | block (see granularity.py; rows are output channels
for weights and tokens for activations, tiles run along the contraction dimension). It stays the
preset's string (so `to_dict` writes what a YAML file holds; a GranularityKind passed in is stored
as its value); code asks `spec.kind`, the GranularityKind, never compares the string. Integer
formats: `symmetric: true` needs a signed format (int8/int4, codes -qmax..qmax, no zero point),
`symmetric: false` an unsigned one (uint8/uint4, integer zero point). `dynamic` says whether an
activation's scales are computed per call (true) or calibrated once (false, STATIC scaling).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from fp8train.quant import reference
from fp8train.quant.config_values import check_mapping, parse_choice
from fp8train.quant.formats import NumberFormat, get_format
from fp8train.quant.granularity import Granularity, GranularityKind
from fp8train.quant.tensor import QuantizedTensor


@dataclass(frozen=True)
class QuantSpec:
    format: str
    granularity: str = GranularityKind.ROW.value
    group_size: int = 128
    symmetric: bool = True
    dynamic: bool = True

    def __post_init__(self):
        fmt = get_format(self.format)
        kind = parse_choice(GranularityKind, self.granularity, "granularity")
        object.__setattr__(self, "granularity", kind.value)
        if self.grouped and (not isinstance(self.group_size, int) or self.group_size < 1):
            raise ValueError(f"group_size={self.group_size!r} must be a positive integer")
        if not fmt.is_float and self.symmetric != fmt.signed:
            want = "a signed format (int8, int4)" if self.symmetric else "an unsigned format (uint8, uint4)"
            raise ValueError(f"format={self.format!r} with symmetric={self.symmetric} needs {want}")

    @property
    def fmt(self) -> NumberFormat:
        return get_format(self.format)

    @property
    def kind(self) -> GranularityKind:
        """Which elements share one scale (the enum of the `granularity` string)."""
        return GranularityKind(self.granularity)

    @property
    def grouped(self) -> bool:
        """TILE or BLOCK: scales per group of `group_size` (1xG tiles, GxG blocks)."""
        return self.kind in (GranularityKind.TILE, GranularityKind.BLOCK)

    @property
    def grid(self) -> Granularity:
        return Granularity(self.kind, self.group_size if self.grouped else 0)

    @property
    def bits(self) -> int:
        return self.fmt.bits

    def quantize(self, x: torch.Tensor) -> QuantizedTensor:
        return reference.quantize(x, self.fmt, self.grid, symmetric=self.symmetric)

    def fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        return reference.fake_quantize(x, self.fmt, self.grid, symmetric=self.symmetric)

    def describe(self) -> str:
        grid = self.grid
        sym = "" if self.fmt.is_float else (" sym" if self.symmetric else " asym")
        return f"{self.format}{sym} {grid!r}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: Any, where: str = "quantizer") -> "QuantSpec":
        check_mapping(cls, raw, where, "{format: int8, granularity: row}")
        if "format" not in raw:
            raise ValueError(f"{where} needs a 'format' ({sorted(f.name for f in dataclasses.fields(cls))})")
        try:
            return cls(**raw)
        except ValueError as error:
            raise ValueError(f"{where}: {error}") from None
