"""Triton building blocks shared by every FP8 kernel: amax, scale, saturating cast.

The numerics are those of the core's reference (`fp8train.quant.reference` / `.scaling`, in the
kernels' layouts: `kernels.fallback`), reproduced bit for bit:

* amax in the integer domain. For x >= 0 the IEEE bit pattern, read as int32, orders like the
  float, so `max |x|` is an integer max of `bits & 0x7FFFFFFF`. Every NaN pattern lies above +inf
  (0x7F800000); we canonicalise it to 0x7FC00000 so a NaN wins every max, including the int32
  `atomic_max` that combines programs. Float `tl.max` would silently drop NaNs on the GPU (it
  lowers to maxnum), and Triton's float `atomic_max` mis-orders NaN; the integer form avoids both.
* IEEE FP32 arithmetic where it matters, subnormals included. A plain `/` in Triton lowers to
  `div.full.f32` (approximate, up to 2 ulp off), and libdevice-based division is linked with
  flush-to-zero (`nvvm-reflect-ftz`), which turns 1 / FLT_MAX or x_subnormal * scale into 0.
  Compiled kernels therefore issue `div.rn.f32` / `mul.rn.f32` as inline PTX (`ieee_div`,
  `ieee_mul`), and test "finite and > 0" on the bit pattern; the interpreter (numpy) is IEEE.
* power-of-2 scales clear the 23 mantissa bits: exact, no log2/exp2 round trip.
* the cast: `clamp(x * scale, -fmax, fmax)` (compare-and-select keeps NaN, like torch.clamp), then
  round to nearest even into FP8. `SOFT=False` uses the sm_90 hardware conversion; `SOFT=True`
  rounds with integer arithmetic (the same algorithm as torch's c10 conversion) for the
  interpreter and pre-Hopper GPUs. Outputs are stored through uint8 views either way.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

# Triton reads the same variable when it decorates the kernels of this package (import time).
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
INTERPRET = tl.constexpr(INTERPRETED)

# Globals read inside @triton.jit functions must be tl.constexpr.
FLT_MAX = tl.constexpr(3.4028234663852886e38)
NAN_BITS = tl.constexpr(0x7FC00000)  # canonical quiet NaN, positive: above every other |x| pattern
INF_BITS = tl.constexpr(0x7F800000)  # also the exponent mask of a positive float


@triton.jit
def to_f32(x):
    """Exact widening to fp32. bf16 goes through its bits: a bf16 is the top half of an fp32 (the
    Triton interpreter's own bf16 -> fp32 conversion loses subnormals; the GPU's does not)."""
    if x.dtype == tl.bfloat16:
        out = (x.to(tl.int16, bitcast=True).to(tl.int32) << 16).to(tl.float32, bitcast=True)
    else:
        out = x.to(tl.float32)
    return out


@triton.jit
def abs_bits(x):
    """int32 bit patterns of |x| (fp32), NaN canonicalised so that integer max == float max."""
    bits = to_f32(x).to(tl.int32, bitcast=True) & 0x7FFFFFFF
    return tl.where(bits > INF_BITS, NAN_BITS, bits)


@triton.jit
def bits_to_float(bits):
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def finite_positive(v):
    """v > 0 and v < inf, on the bits (false for 0, -0, negatives, inf, NaN; true for subnormals)."""
    bits = v.to(tl.int32, bitcast=True)
    return (bits > 0) & (bits < INF_BITS)


@triton.jit
def _ptx_f32(asm: tl.constexpr, a, b):
    args = [a.to(tl.int32, bitcast=True), b.to(tl.int32, bitcast=True)]
    out = tl.inline_asm_elementwise(asm, "=r,r,r", args, dtype=tl.int32, is_pure=True, pack=1)
    return out.to(tl.float32, bitcast=True)


@triton.jit
def ieee_div(a, b):
    """a / b for fp32 blocks (not 0-d): round to nearest even, no flush to zero."""
    if INTERPRET:
        out = tl.math.div_rn(a, b)
    else:
        out = _ptx_f32("div.rn.f32 $0, $1, $2;", a, b)
    return out


@triton.jit
def ieee_mul(a, b):
    """a * b for fp32 blocks (broadcasting): round to nearest even, no flush to zero, no FMA."""
    if INTERPRET:
        out = a * b
    else:
        out = _ptx_f32("mul.rn.f32 $0, $1, $2;", a, b)
    return out


@triton.jit
def scale_from_amax(amax, FMAX: tl.constexpr, POW2: tl.constexpr):
    """fmax / amax if amax is finite and > 0, else 1.0; inf -> FLT_MAX; optional power of 2."""
    ok = finite_positive(amax)
    scale = ieee_div(tl.where(ok, FMAX, 1.0), tl.where(ok, amax, 1.0))
    scale = tl.where(scale > FLT_MAX, FLT_MAX, scale)
    if POW2:
        scale = (scale.to(tl.int32, bitcast=True) & INF_BITS).to(tl.float32, bitcast=True)
    return scale


@triton.jit
def reciprocal(scale):
    """1 / scale, correctly rounded (1 / FLT_MAX is subnormal: kept)."""
    return ieee_div(tl.zeros_like(scale) + 1.0, scale)


@triton.jit
def _round_bits(a, SHIFT: tl.constexpr, REBIAS: tl.constexpr, MIN_NORMAL: tl.constexpr,
                MAGIC: tl.constexpr, MAGIC_BITS: tl.constexpr):
    """|y| bits (fp32, <= fmax) -> FP8 code without sign, round to nearest even.

    Normal range: add half an FP8 ulp minus one, plus the lowest kept bit (ties to even), shift the
    dropped mantissa bits out, rebias the exponent; a mantissa carry rolls into the exponent.
    Subnormal range: adding MAGIC, whose FP32 ulp is the FP8 subnormal step, makes the FP32 adder
    round to that step (nearest even); the integer difference of bit patterns is the code.
    """
    odd = (a >> SHIFT) & 1
    normal = ((a + ((1 << (SHIFT - 1)) - 1) + odd) >> SHIFT) - REBIAS
    af = a.to(tl.float32, bitcast=True)
    subnormal = (af + MAGIC).to(tl.int32, bitcast=True) - MAGIC_BITS
    code = tl.where(af < MIN_NORMAL, subnormal, normal)
    return tl.where(a > INF_BITS, 0x7F, code)  # NaN -> 0x7F (both formats)


@triton.jit
def fp8_bits(y, IS_E5M2: tl.constexpr, SOFT: tl.constexpr):
    """Saturated fp32 `y` -> FP8 bytes (uint8), round to nearest even."""
    if SOFT:
        bits = y.to(tl.int32, bitcast=True)
        sign = (bits >> 24) & 0x80
        a = bits & 0x7FFFFFFF
        if IS_E5M2:  # 2 mantissa bits, bias 15, subnormal step 2^-16
            code = _round_bits(a, 21, 112 << 2, 6.103515625e-05, 128.0, 134 << 23)
        else:  # E4M3: 3 mantissa bits, bias 7, subnormal step 2^-9
            code = _round_bits(a, 20, 120 << 3, 0.015625, 16384.0, 141 << 23)
        out = (code | sign).to(tl.uint8)
    else:
        if IS_E5M2:
            out = y.to(tl.float8e5, fp_downcast_rounding="rtne").to(tl.uint8, bitcast=True)
        else:
            out = y.to(tl.float8e4nv, fp_downcast_rounding="rtne").to(tl.uint8, bitcast=True)
    return out


@triton.jit
def quantize(x, scale, FMAX: tl.constexpr, IS_E5M2: tl.constexpr, SOFT: tl.constexpr):
    """FP8 bytes of clamp(x * scale, -fmax, fmax); `scale` broadcasts against `x`."""
    y = ieee_mul(to_f32(x), scale)
    y = tl.where(y > FMAX, FMAX, tl.where(y < -FMAX, -FMAX, y))  # NaN compares false: stays NaN
    return fp8_bits(y, IS_E5M2, SOFT)
