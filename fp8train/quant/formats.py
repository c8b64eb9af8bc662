"""Number formats a tensor can be quantized to: FP8 (training, FP8 serving) and integers (PTQ).

| name  | kind  | codes stored as       | largest code | smallest code | notes                          |
|-------|-------|-----------------------|-------------:|--------------:|--------------------------------|
| e4m3  | float | torch.float8_e4m3fn   |          448 |          -448 | 3 mantissa bits, subnormal 2^-9 |
| e5m2  | float | torch.float8_e5m2     |        57344 |        -57344 | 2 mantissa bits, subnormal 2^-16 |
| int8  | int   | torch.int8            |          127 |          -128 | symmetric grids use -127..127  |
| uint8 | int   | torch.uint8           |          255 |             0 | asymmetric (zero point)        |
| int4  | int   | torch.int8 (unpacked) |            7 |            -8 | symmetric grids use -7..7      |
| uint4 | int   | torch.uint8 (unpacked)|           15 |             0 | asymmetric (zero point)        |

A float format's codes are the FP8 values themselves; an integer format's codes are integers, one
per byte until packed (packing.py puts two 4-bit codes in a byte, or eight in an int32).

torch's `tensor.to(fp8)` rounds to nearest even but does NOT saturate: values beyond the max
become NaN (e4m3fn) or inf (e5m2). Every cast here clamps to the format's range first.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch

FLT_MAX = torch.finfo(torch.float32).max


class FormatKind(Enum):
    FLOAT = "float"
    INT = "int"


@dataclass(frozen=True)
class NumberFormat:
    """One quantized number format: its name in configs, how codes are stored, its code range."""

    name: str
    kind: FormatKind
    dtype: torch.dtype  # storage dtype of one (unpacked) code
    max: float  # largest finite code
    min: float  # smallest code
    bits: int
    mantissa_bits: int = 0  # float formats only

    @property
    def is_float(self) -> bool:
        return self.kind is FormatKind.FLOAT

    @property
    def signed(self) -> bool:
        return self.min < 0

    def __repr__(self) -> str:
        return self.name.upper()


E4M3 = NumberFormat("e4m3", FormatKind.FLOAT, torch.float8_e4m3fn, 448.0, -448.0, 8, 3)
E5M2 = NumberFormat("e5m2", FormatKind.FLOAT, torch.float8_e5m2, 57344.0, -57344.0, 8, 2)
INT8 = NumberFormat("int8", FormatKind.INT, torch.int8, 127.0, -128.0, 8)
UINT8 = NumberFormat("uint8", FormatKind.INT, torch.uint8, 255.0, 0.0, 8)
INT4 = NumberFormat("int4", FormatKind.INT, torch.int8, 7.0, -8.0, 4)
UINT4 = NumberFormat("uint4", FormatKind.INT, torch.uint8, 15.0, 0.0, 4)

FORMATS = {f.name: f for f in (E4M3, E5M2, INT8, UINT8, INT4, UINT4)}
FP8_FORMATS = (E4M3, E5M2)


def get_format(name: str) -> NumberFormat:
    """Look a format up by its config name ("e4m3", "e5m2", "int8", "uint8", "int4", "uint4")."""
    try:
        return FORMATS[name.lower()]
    except (KeyError, AttributeError):
        raise ValueError(f"unknown number format {name!r}; choose one of {sorted(FORMATS)}") from None


def fp8_format(name: str) -> NumberFormat:
    """Like get_format, restricted to the FP8 formats (recipes of FP8 training)."""
    fmt = get_format(name)
    if fmt not in FP8_FORMATS:
        raise ValueError(f"{name!r} is not an FP8 format; choose one of {[f.name for f in FP8_FORMATS]}")
    return fmt


def format_of_dtype(dtype: torch.dtype) -> NumberFormat:
    """The FP8 format stored as `dtype` (integer dtypes are ambiguous: int8 holds int8 and int4)."""
    for fmt in FP8_FORMATS:
        if fmt.dtype == dtype:
            return fmt
    raise ValueError(f"{dtype} is not an FP8 dtype; expected one of {[f.dtype for f in FP8_FORMATS]}")
