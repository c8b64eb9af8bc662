"""Exact comparisons for kernel tests: FP8 bytes and FP32 bit patterns (NaN canonicalised)."""

from __future__ import annotations

import torch

from kernels.fallback import FP8_MAX


def fp8_codes(q: torch.Tensor) -> torch.Tensor:
    """uint8 codes with every NaN as 0x7F: the sign of a NaN is platform-defined."""
    b = q.detach().cpu().view(torch.uint8)
    low = b & 0x7F
    nan = low == 0x7F if q.dtype == torch.float8_e4m3fn else low > 0x7C
    return torch.where(nan, torch.full_like(b, 0x7F), b)


def f32_bits(t: torch.Tensor) -> torch.Tensor:
    """int32 bit patterns with every NaN as 0x7FC00000."""
    t = t.detach().cpu().float()
    bits = t.contiguous().view(torch.int32)
    return torch.where(torch.isnan(t), torch.full_like(bits, 0x7FC00000), bits)


def assert_fp8_equal(actual: torch.Tensor, expected: torch.Tensor, what: str = "fp8") -> None:
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = fp8_codes(actual), fp8_codes(expected)
    bad = (a != e).nonzero()
    assert bad.numel() == 0, f"{what}: {bad.shape[0]} bytes differ, first at {bad[0].tolist()}: " \
        f"{a[tuple(bad[0])].item():#04x} != {e[tuple(bad[0])].item():#04x}"


def assert_f32_equal(actual: torch.Tensor, expected: torch.Tensor, what: str = "fp32") -> None:
    """Bitwise equal FP32 values, same shape and same strides (layouts are part of the contract)."""
    assert actual.dtype == torch.float32, f"{what}: dtype {actual.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.stride() == expected.stride(), f"{what}: strides {actual.stride()} != {expected.stride()}"
    a, e = f32_bits(actual), f32_bits(expected)
    bad = (a != e).nonzero()
    assert bad.numel() == 0, f"{what}: {bad.shape[0]} values differ, first at {bad[0].tolist()}: " \
        f"{actual.cpu()[tuple(bad[0])].item()!r} != {expected.cpu()[tuple(bad[0])].item()!r}"


def special_input(m: int, k: int, dtype: torch.dtype, seed: int = 0, spread: float = 30.0) -> torch.Tensor:
    """Random normal data with zeros, -0.0, huge values (saturation) and tiny values (subnormals)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * spread
    x[0, :] = 0.0  # a zero row
    x[1, 1::2] = -0.0
    x[2, :7] = torch.tensor([1e4, -1e4, 6e4, -6e4, 1e30, -1e30, 3e38])
    x[3, :] = torch.randn(k, generator=g) * 1e-6  # underflows into FP8 subnormals / zero
    return x.to(dtype)


def fp8_max(fp8_dtype: torch.dtype) -> float:
    return FP8_MAX[fp8_dtype]
