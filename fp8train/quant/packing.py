"""Packing 4-bit codes two to a byte (the layout the fused low-bit kernels read).

    packed[r, j] = (codes[r, 2j] & 0xF) | (codes[r, 2j + 1] << 4)     low nibble first

Signed codes (INT4, -8..7) are stored in two's complement nibbles and sign-extended on unpack;
unsigned codes (UINT4, 0..15) are stored as they are. Export formats with other packings
(compressed-tensors' eight codes per int32) use that library's own packer.
"""

from __future__ import annotations

import torch

from fp8train.quant.formats import NumberFormat


def pack_4bit(codes: torch.Tensor) -> torch.Tensor:
    """[R, C] int8/uint8 codes in -8..15 -> [R, C/2] uint8 (C even)."""
    if codes.dim() != 2 or codes.shape[1] % 2:
        raise ValueError(f"pack_4bit needs a 2-D tensor with an even number of columns, got {tuple(codes.shape)}")
    nibbles = codes.to(torch.int16) & 0xF
    return (nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)).to(torch.uint8)


def unpack_4bit(packed: torch.Tensor, fmt: NumberFormat) -> torch.Tensor:
    """[R, C/2] uint8 -> [R, C] codes in fmt.dtype (sign-extended for signed formats)."""
    if fmt.bits != 4:
        raise ValueError(f"unpack_4bit needs a 4-bit format, got {fmt!r}")
    wide = packed.to(torch.int16)
    nibbles = torch.stack([wide & 0xF, wide >> 4], dim=-1).reshape(packed.shape[0], -1)
    if fmt.signed:
        nibbles = torch.where(nibbles >= 8, nibbles - 16, nibbles)
    return nibbles.to(fmt.dtype)
