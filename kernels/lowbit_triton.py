"""Triton building blocks of the integer (PTQ / KV-cache) kernels, bit-exact with fp8train.quant.

The core's integer rules (fp8train/quant/scaling.py `int_grid`, reference.py `int_codes`):

    symmetric   step = amax / qmax (0 -> 1)            q = clamp(rne(x / step), -qmax, qmax)
    asymmetric  lo = min(min x, 0), hi = max(max x, 0)
                step = (hi - lo) / qmax (0 -> 1)       zero = clamp(rne(-lo / step), 0, qmax)
                                                       q = clamp(rne(x / step) + zero, 0, qmax)

Divisions are IEEE (`fp8_triton.ieee_div`: div.rn.f32, not Triton's approximate `/`) and rne is
round-half-to-even done by the FP32 adder: for |y| < 2^22, (y + 1.5 * 2^23) - 1.5 * 2^23 rounds y
to an integer with ties to even (the ulp at 1.5 * 2^23 is 1). All |y| here are <= qmax + 1.

4-bit codes are packed two a byte, low nibble = even index (fp8train.quant.packing); signed codes
are two's complement nibbles, sign-extended with shifts on int32.

`hadamard_row` is fp8train.quant.hadamard's randomized Walsh-Hadamard rotation with the same FP32
operations in the same order (bit-identical).

`mma` is tl.dot that survives the interpreter: Triton 3.9's interpreter computes garbage for bf16
dot operands, so interpreted kernels upcast them to FP32 (exact; only the summation order differs
from the GPU's FP32-accumulating tensor-core dot).
"""

from __future__ import annotations

import triton
import triton.language as tl

from kernels.fp8_triton import INTERPRET, ieee_div, to_f32  # noqa: F401  (to_f32 re-exported)

RNE_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2^23


@triton.jit
def rne(y):
    """Round to the nearest integer, ties to even, |y| < 2^22 (FP32 in, FP32 out)."""
    return (y + RNE_MAGIC) - RNE_MAGIC


@triton.jit
def sym_step(amax, QMAX: tl.constexpr):
    step = ieee_div(amax, tl.zeros_like(amax) + QMAX)
    return tl.where(step > 0, step, 1.0)


@triton.jit
def sym_codes(x, step, QMAX: tl.constexpr):
    q = rne(ieee_div(x, step))
    return tl.minimum(tl.maximum(q, -QMAX), QMAX).to(tl.int32)


@triton.jit
def asym_grid(lo, hi, QMAX: tl.constexpr):
    """(step, zero as FP32) for groups with minimum lo and maximum hi (not yet widened to 0)."""
    lo = tl.minimum(lo, 0.0)
    hi = tl.maximum(hi, 0.0)
    step = ieee_div(hi - lo, tl.zeros_like(hi) + QMAX)
    step = tl.where(step > 0, step, 1.0)
    zero = tl.minimum(tl.maximum(rne(ieee_div(-lo, step)), 0.0), QMAX)
    return step, zero


@triton.jit
def asym_codes(x, step, zero, QMAX: tl.constexpr):
    q = rne(ieee_div(x, step)) + zero
    return tl.minimum(tl.maximum(q, 0.0), QMAX).to(tl.int32)


@triton.jit
def pack_pairs(codes, ROWS: tl.constexpr, COLS: tl.constexpr):
    """int32 codes [ROWS, COLS] -> uint8 [ROWS, COLS / 2], low nibble = even column."""
    even, odd = tl.split(tl.reshape(codes, (ROWS, COLS // 2, 2)))
    return ((even & 0xF) | ((odd & 0xF) << 4)).to(tl.uint8)


@triton.jit
def code_f32(u, WBITS: tl.constexpr, SIGNED: tl.constexpr):
    """A WBITS-bit field u in [0, 2^WBITS) (int32; two's complement if SIGNED) as its exact FP32
    value, with no int -> float conversion instruction. OR-ed into the mantissa of 2^23 (bits
    0x4B000000), the bits are the float 2^23 + u, and one exact FP32 subtraction leaves u. Signed:
    u XOR 2^(WBITS - 1) (the sign bit flipped) is the code + 2^(WBITS - 1), so the XOR joins the mask
    and 2^23 + 2^(WBITS - 1) is subtracted. I2F runs at a quarter of the FMA rate on sm_90; a bit op
    and an FADD run at full rate (int4 dequantizers use the same trick with FP16's 0x6400)."""
    if SIGNED:
        bits = u ^ (0x4B000000 | (1 << (WBITS - 1)))
        out = bits.to(tl.float32, bitcast=True) - (8388608.0 + (1 << (WBITS - 1)))
    else:
        out = (u | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
    return out


@triton.jit
def unpack_pairs(packed, SIGNED: tl.constexpr):
    """uint8 bytes -> (even codes, odd codes) as int32 (sign-extended if SIGNED)."""
    w = packed.to(tl.int32) & 0xFF
    if SIGNED:
        even = (w << 28) >> 28
        odd = (w << 24) >> 28
    else:
        even = w & 0xF
        odd = w >> 4
    return even, odd


@triton.jit
def mma(a, b, acc):
    """acc + a @ b with FP32 accumulation; operands of one dtype (see the module docstring). K >= 16
    is asserted at compile time: no silent off-tensor-core fallback (one computed garbage for the
    8-slot KIVI tiles on an H200; the KV launcher now rejects such sizes with a clear error)."""
    tl.static_assert(a.shape[1] >= 16, "mma: K < 16 (tensor-core dots need K >= 16; callers pick legal tiles)")
    if INTERPRET:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    elif a.dtype == tl.float32:
        out = tl.dot(a, b, acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc)
    return out


@triton.jit
def hadamard_row(x, signs, inv_sqrt, D: tl.constexpr, LOG2_D: tl.constexpr):
    """R x for an FP32 row x [D]: butterflies (a, b) -> (a + b, a - b) at strides 1, 2, 4, ...,
    then one multiply by inv_sqrt = fp32(1 / sqrt(D)) (fp8train/quant/hadamard.py)."""
    y = x * signs
    for i in tl.static_range(LOG2_D):  # stride h = 2^i (a constexpr per unrolled step)
        pairs = tl.permute(tl.reshape(y, (D >> (i + 1), 2, 1 << i)), (0, 2, 1))  # [D / 2h, h, 2]
        a, b = tl.split(pairs)
        y = tl.reshape(tl.permute(tl.join(a + b, a - b), (0, 2, 1)), (D,))
    return y * inv_sqrt


@triton.jit
def int_to(x, DT: tl.constexpr):
    """Integer codes -> DT (exact for |x| <= 256). Through FP32 in the interpreter, whose direct
    int -> bf16 conversion returns garbage (Triton 3.9)."""
    if INTERPRET:
        out = x.to(tl.float32).to(DT)
    else:
        out = x.to(DT)
    return out


@triton.jit
def to_bf16(x):
    """FP32 -> bf16, round to nearest even (the interpreter's own conversion does not round)."""
    if INTERPRET:
        bits = x.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        out = bits.to(tl.int16).to(tl.bfloat16, bitcast=True)
    else:
        out = x.to(tl.bfloat16)
    return out


@triton.jit
def store_as(ptr, x, mask=None):
    """Store FP32 x into ptr's element type (bf16 rounded to nearest even)."""
    if ptr.dtype.element_ty == tl.bfloat16:
        tl.store(ptr, to_bf16(x), mask=mask)
    else:
        tl.store(ptr, x.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def fp8_to_f32(codes_u8):
    """E4M3 bytes -> FP32 (exact; NaN codes never occur in a saturating cache)."""
    return codes_u8.to(tl.float8e4nv, bitcast=True).to(tl.float32)
