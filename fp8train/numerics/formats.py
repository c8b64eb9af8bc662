"""FP8 formats and the saturating cast.

Two 8-bit float formats exist on Hopper tensor cores (OCP FP8):

| format | torch dtype            | max normal | smallest subnormal | mantissa bits |
|--------|------------------------|-----------:|-------------------:|--------------:|
| E4M3   | torch.float8_e4m3fn    |        448 |               2^-9 |             3 |
| E5M2   | torch.float8_e5m2      |      57344 |              2^-16 |             2 |

E4M3 has more precision, E5M2 more range. torch's own `tensor.to(fp8)` rounds to nearest-even
but does NOT saturate: values beyond the max become NaN (e4m3fn) or inf (e5m2). Training casts
must clamp to +-max first, which is what `saturating_cast` does. NaN inputs stay NaN (clamp keeps
NaN), so a NaN can never hide behind a finite FP8 value.

Quantization multiplies by a `scale` before the cast (x_fp8 = sat(x * scale)); dequantization
multiplies by `scale_inv = 1 / scale`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class FP8Format:
    """One FP8 format: its name in recipes, torch dtype and largest finite value."""

    name: str
    dtype: torch.dtype
    max: float
    mantissa_bits: int


E4M3 = FP8Format("e4m3", torch.float8_e4m3fn, 448.0, 3)
E5M2 = FP8Format("e5m2", torch.float8_e5m2, 57344.0, 2)
FORMATS = {f.name: f for f in (E4M3, E5M2)}
FLT_MAX = torch.finfo(torch.float32).max


def get_format(name: str) -> FP8Format:
    """Look a format up by its recipe name ("e4m3" or "e5m2")."""
    try:
        return FORMATS[name.lower()]
    except (KeyError, AttributeError):
        raise ValueError(f"unknown FP8 format {name!r}; choose one of {sorted(FORMATS)}") from None


def format_of_dtype(dtype: torch.dtype) -> FP8Format:
    for fmt in FORMATS.values():
        if fmt.dtype == dtype:
            return fmt
    raise ValueError(f"{dtype} is not an FP8 dtype; expected one of {[f.dtype for f in FORMATS.values()]}")


def saturating_cast(x_scaled: torch.Tensor, fmt: FP8Format) -> torch.Tensor:
    """Clamp an already-scaled tensor to +-fmt.max and cast it (round to nearest even)."""
    return x_scaled.clamp(-fmt.max, fmt.max).to(fmt.dtype)


def quantize_with_scale(x_hp: torch.Tensor, scale: torch.Tensor, fmt: FP8Format) -> torch.Tensor:
    """x_fp8 = sat(x * scale), the multiply in FP32 (scale broadcasts: scalar, per row, per tile)."""
    return saturating_cast(x_hp.float() * scale, fmt)
