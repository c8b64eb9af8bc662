"""Randomized Hadamard rotation: spread outlier channels over all channels before quantizing.

A vector whose energy sits in a few channels (the keys of real LLMs: KIVI, QuaRot) quantizes badly
in groups along those channels: the group holding an outlier gets a coarse step. An orthogonal
rotation R mixes every channel into every other, so after it no channel stands out, and dot
products survive it exactly: (R q) . (R k) = q . k. QuaRot / SpinQuant use

    R = H_n diag(s) / sqrt(n)      H_n the n x n Walsh-Hadamard matrix (entries +-1, n a power of 2),
                                   s random signs (+-1), so R R^T = I

applied here as the fast Walsh-Hadamard transform: log2(n) butterfly stages, stage h (h = 1, 2, 4,
...) views x as [n / 2h, 2, h] and maps each pair (a, b) = (x[:, 0, :], x[:, 1, :]) to (a + b, a - b).
Only FP32 adds and subtractions in this fixed order, then one multiply by 1 / sqrt(n): the Triton
version (kernels/lowbit_triton.py `hadamard_row`) performs the same operations in the same order,
so both produce the same bits.
"""

from __future__ import annotations

import math

import torch


def hadamard_size_ok(n: int) -> bool:
    """H_n exists here for n a power of 2, n >= 2."""
    return n >= 2 and n & (n - 1) == 0


def check_size(n: int) -> None:
    if not hadamard_size_ok(n):
        raise ValueError(f"a Hadamard rotation needs a power-of-2 size >= 2, got {n}")


def random_signs(n: int, seed: int = 0, device: torch.device | str = "cpu") -> torch.Tensor:
    """s: n FP32 signs (+-1), deterministic for a seed (the rotation is part of the format)."""
    check_size(n)
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 2, (n,), generator=g) * 2 - 1).float().to(device)


def hadamard_transform(x: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """R x along the last dim in FP32: (H_n (x * s)) / sqrt(n), x [..., n] (see the module docstring)."""
    n = x.shape[-1]
    check_size(n)
    y = x.float() * signs
    lead = y.shape[:-1]
    h = 1
    while h < n:
        pairs = y.reshape(*lead, n // (2 * h), 2, h)  # [..., n/2h, 2, h]
        a, b = pairs[..., 0, :], pairs[..., 1, :]
        y = torch.stack((a + b, a - b), dim=-2).reshape(*lead, n)
        h *= 2
    return y * inverse_sqrt(n)


def inverse_sqrt(n: int) -> float:
    """1 / sqrt(n) rounded to FP32 once: the one constant both implementations multiply by."""
    return float(torch.tensor(1.0 / math.sqrt(n), dtype=torch.float32))


def hadamard_matrix(signs: torch.Tensor) -> torch.Tensor:
    """The rotation as a matrix M [n, n] with x @ M = hadamard_transform(x) (up to FP32 rounding)."""
    n = signs.numel()
    return hadamard_transform(torch.eye(n, device=signs.device), signs)


def inverse_hadamard_transform(y: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """R^T y = diag(s) H_n y / sqrt(n) (H_n is symmetric): undoes `hadamard_transform` up to FP32 rounding."""
    return hadamard_transform(y, torch.ones_like(signs)) * signs
