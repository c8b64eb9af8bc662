"""A PTQ preset as data: conf/quant/<name>.yaml -> PtqConfig (unknown keys and values are errors).

    name: gptq_w4_g128
    method: gptq                      # rtn | gptq | awq | smoothquant
    weight: {format: uint4, granularity: tile, group_size: 128, symmetric: false}   # a QuantSpec
    input: null                       # or {format: int8, granularity: row, dynamic: true} (W8A8)
    gptq: {percdamp: 0.01, block_size: 128, act_order: true, static_groups: true}
    awq: {grid: 20, clip: true, ...}  smoothquant: {alpha: 0.5}
    outliers: {threshold: 6.0}        # input channels with max|x| > threshold stay high precision

`weight` and `input` are fp8train.quant.QuantSpec, the same quantizer data QAT presets use.
FP8 W8A8 is `method: rtn` with e4m3 specs; the DeepSeek-V3 FP8 export is e4m3 128x128 blocks with
1x128 input tiles.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from fp8train.ptq.awq import AwqOptions
from fp8train.ptq.gptq import GptqOptions
from fp8train.ptq.smoothquant import SmoothQuantOptions
from fp8train.quant.config_values import check_mapping
from fp8train.quant.spec import QuantSpec


class Method(Enum):
    RTN = "rtn"
    GPTQ = "gptq"
    AWQ = "awq"
    SMOOTHQUANT = "smoothquant"


@dataclass(frozen=True)
class OutlierOptions:
    threshold: float | None = None  # LLM.int8 uses 6.0

    def __post_init__(self):
        if self.threshold is not None and self.threshold <= 0:
            raise ValueError(f"outliers.threshold={self.threshold} must be > 0 (or null to disable)")


def _options(cls, raw: Any, where: str):
    if raw is None:
        return cls()
    check_mapping(cls, raw, where)
    return cls(**raw)


@dataclass(frozen=True)
class PtqConfig:
    method: Method
    weight: QuantSpec
    input: QuantSpec | None = None
    name: str = "custom"
    description: str = ""
    gptq: GptqOptions = field(default_factory=GptqOptions)
    awq: AwqOptions = field(default_factory=AwqOptions)
    smoothquant: SmoothQuantOptions = field(default_factory=SmoothQuantOptions)
    outliers: OutlierOptions = field(default_factory=OutlierOptions)

    def __post_init__(self):
        if self.method in (Method.GPTQ, Method.AWQ) and self.weight.fmt.is_float:
            raise ValueError(f"method={self.method.value} quantizes to integer grids; got weight "
                             f"{self.weight.describe()} (use method: rtn for FP8)")
        if self.method is Method.SMOOTHQUANT and self.input is None:
            raise ValueError("method=smoothquant needs an input quantizer (W8A8), e.g. "
                             "input: {format: int8, granularity: row, dynamic: true}")

    @classmethod
    def from_dict(cls, raw: Any) -> "PtqConfig":
        if not isinstance(raw, dict):
            raise ValueError(f"a PTQ preset must be a mapping, got {raw!r}")
        allowed = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - allowed)
        if unknown:
            raise ValueError(f"unknown key(s) {unknown} in the quant preset; allowed keys: {sorted(allowed)}")
        for key in ("method", "weight"):
            if raw.get(key) is None:
                raise ValueError(f"the quant preset needs '{key}'")
        try:
            method = Method(raw["method"])
        except ValueError:
            raise ValueError(f"method={raw['method']!r} is not allowed; choose one of "
                             f"{[m.value for m in Method]}") from None
        return cls(method=method, weight=QuantSpec.from_dict(dict(raw["weight"]), "weight"),
                   input=None if raw.get("input") is None else QuantSpec.from_dict(dict(raw["input"]), "input"),
                   name=str(raw.get("name", "custom")), description=str(raw.get("description", "")),
                   gptq=_options(GptqOptions, raw.get("gptq"), "gptq"),
                   awq=_options(AwqOptions, raw.get("awq"), "awq"),
                   smoothquant=_options(SmoothQuantOptions, raw.get("smoothquant"), "smoothquant"),
                   outliers=_options(OutlierOptions, raw.get("outliers"), "outliers"))

    def to_dict(self) -> dict:
        return {"name": self.name, "description": self.description, "method": self.method.value,
                "weight": self.weight.to_dict(), "input": None if self.input is None else self.input.to_dict(),
                "gptq": dataclasses.asdict(self.gptq), "awq": dataclasses.asdict(self.awq),
                "smoothquant": dataclasses.asdict(self.smoothquant), "outliers": dataclasses.asdict(self.outliers)}
