"""Shared Triton helpers of the low-bit kernels (kernels/lowbit_triton.py), exhaustively, in the
interpreter on a CPU (and compiled where a GPU is present, via the `device` fixture)."""

import torch
import triton
import triton.language as tl

from kernels.lowbit_triton import code_f32, pack_pairs, unpack_pairs


@triton.jit
def _nibbles_both_ways(packed_ptr, magic_ptr, ref_ptr, SIGNED: tl.constexpr, B: tl.constexpr):
    packed = tl.load(packed_ptr + tl.arange(0, B))
    even_u, odd_u = unpack_pairs(packed, False)
    even_i, odd_i = unpack_pairs(packed, SIGNED)
    tl.store(magic_ptr + tl.arange(0, B), code_f32(even_u, 4, SIGNED))
    tl.store(magic_ptr + B + tl.arange(0, B), code_f32(odd_u, 4, SIGNED))
    tl.store(ref_ptr + tl.arange(0, B), even_i.to(tl.float32))
    tl.store(ref_ptr + B + tl.arange(0, B), odd_i.to(tl.float32))


def test_code_f32_is_the_integer_conversion_for_every_byte(device):
    """All 256 bytes: the magic-number value of each nibble equals the unpacked integer, converted."""
    packed = torch.arange(256, dtype=torch.int32).to(torch.uint8).to(device)
    for signed in (False, True):
        magic = torch.empty(2, 256, device=device)
        ref = torch.empty(2, 256, device=device)
        _nibbles_both_ways[(1,)](packed, magic, ref, signed, 256)
        assert torch.equal(magic, ref), f"signed={signed}"
        lo = -8 if signed else 0
        assert ref.min().item() == lo and ref.max().item() == lo + 15


@triton.jit
def _pack_unpack(codes_ptr, out_ptr, ROWS: tl.constexpr, COLS: tl.constexpr):
    idx = tl.arange(0, ROWS)[:, None] * COLS + tl.arange(0, COLS)[None, :]
    packed = pack_pairs(tl.load(codes_ptr + idx), ROWS, COLS)
    even, odd = unpack_pairs(packed, True)
    half = tl.arange(0, ROWS)[:, None] * (COLS // 2) + tl.arange(0, COLS // 2)[None, :]
    tl.store(out_ptr + 2 * half, even)
    tl.store(out_ptr + 2 * half + 1, odd)


def test_pack_then_unpack_round_trips_signed_codes(device):
    codes = (torch.arange(16 * 32, dtype=torch.int32) % 16 - 8).reshape(16, 32).to(device)
    out = torch.empty_like(codes)
    _pack_unpack[(1,)](codes, out, 16, 32)
    assert torch.equal(out, codes)
