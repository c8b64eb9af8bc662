"""Pure-torch references for every kernel in `kernels/`: the numerics, written once, readably.

Each Triton kernel must reproduce these functions bit for bit; the tests compare FP8 bytes and
FP32 scales exactly. The rules (shared with `fp8train.numerics`):

* `fmax` is the largest finite FP8 value: 448 (E4M3, `float8_e4m3fn`), 57344 (E5M2).
* Saturating cast: `q = clamp(x.float() * scale, -fmax, fmax).to(fp8)`: an FP32 multiply, then
  round-to-nearest-even in the dtype conversion. NaN stays NaN (its FP8 sign is not specified:
  CPUs keep the sign of a NaN, NVIDIA GPUs return a positive canonical NaN).
* Current scale from an FP32 amax: `fmax / amax` (a true FP32 division, never `fmax * (1/amax)`,
  which can be one ulp off) when amax is finite and > 0, else 1.0; an infinite quotient becomes
  FLT_MAX. `power_of_2` rounds the scale down to a power of two by clearing its mantissa bits,
  which is exact. `scale_inv = 1 / scale` in FP32.
* amax = max |x| over a group, in FP32, NaN if the group holds a NaN.

Beware: `python_float / tensor` in torch computes `tensor.reciprocal() * python_float`, which is
not a correctly rounded division. This module always divides tensor by tensor (`torch.div`).

Layouts returned by the blockwise quantizers are the ones `torch._scaled_mm` / `F.scaled_mm`
expect for 1x128 and 128x128 block scaling: see each function.
"""

from __future__ import annotations

import torch

FLT_MAX = torch.finfo(torch.float32).max
FP8_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}
HP_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
BLOCK = 128  # tile edge of the blockwise recipes (DeepSeek-V3)
EXPONENT_MASK = 0x7F800000  # sign bit is 0 for a positive scale; keep the exponent only
DELAYED_ALGOS = ("max", "most_recent")


# ---------------------------------------------------------------- argument checks (shared)
def fp8_max(fp8_dtype: torch.dtype) -> float:
    """Largest finite value of an FP8 dtype; ValueError for anything else."""
    if fp8_dtype not in FP8_MAX:
        raise ValueError(f"fp8_dtype must be one of {list(FP8_MAX)}, got {fp8_dtype}")
    return FP8_MAX[fp8_dtype]


def check_input(x_hp: torch.Tensor, name: str = "x_hp") -> None:
    """A 2-D contiguous bf16/fp16/fp32 tensor, or ValueError saying what is wrong."""
    if x_hp.dim() != 2:
        raise ValueError(f"{name} must be 2-D [M, K], got shape {tuple(x_hp.shape)}")
    if x_hp.dtype not in HP_DTYPES:
        raise ValueError(f"{name} dtype must be one of {HP_DTYPES}, got {x_hp.dtype}")
    if not x_hp.is_contiguous():
        raise ValueError(f"{name} must be contiguous (strides {x_hp.stride()}); call .contiguous()")


def check_multiple_of_block(x_hp: torch.Tensor, axis: int, dim: str, op: str) -> None:
    """ValueError naming the dimension (e.g. "K (dim 1)") unless x_hp.shape[axis] % 128 == 0."""
    if x_hp.shape[axis] % BLOCK != 0:
        raise ValueError(f"{op} needs {dim} (dim {axis}) to be a multiple of {BLOCK}, "
                         f"got {dim}={x_hp.shape[axis]}")


def check_scale(scale: torch.Tensor, x_hp: torch.Tensor) -> None:
    if scale.dtype != torch.float32 or scale.numel() != 1 or scale.device != x_hp.device:
        raise ValueError(
            f"scale must be a float32 tensor of one element on {x_hp.device}, "
            f"got {scale.dtype} shape {tuple(scale.shape)} on {scale.device}"
        )


# ---------------------------------------------------------------- the numerics
def abs_max(x: torch.Tensor, dim=None) -> torch.Tensor:
    """FP32 max |x| over `dim` (all dims if None); NaN propagates (torch.amax does that)."""
    a = x.float().abs()
    if a.numel() == 0:
        return torch.zeros(1, dtype=torch.float32, device=x.device)
    return a.amax() if dim is None else a.amax(dim=dim)


def scale_from_amax(amax: torch.Tensor, fmax: float, power_of_2: bool) -> torch.Tensor:
    """Current scale: fmax / amax if amax is finite and > 0, else 1; inf -> FLT_MAX."""
    ok = torch.isfinite(amax) & (amax > 0)
    numerator = torch.where(ok, fmax, 1.0).to(torch.float32)
    scale = torch.div(numerator, torch.where(ok, amax, 1.0))
    scale = torch.where(torch.isinf(scale), FLT_MAX, scale)
    if power_of_2:
        scale = (scale.view(torch.int32) & EXPONENT_MASK).view(torch.float32)
    return scale


def reciprocal(scale: torch.Tensor) -> torch.Tensor:
    """1 / scale as a correctly rounded FP32 division."""
    return torch.div(torch.ones_like(scale), scale)


def saturating_cast(x_hp: torch.Tensor, scale: torch.Tensor, fp8_dtype: torch.dtype) -> torch.Tensor:
    """clamp(x * scale, -fmax, fmax) -> fp8, multiply in FP32 (scale broadcasts)."""
    fmax = fp8_max(fp8_dtype)
    return (x_hp.float() * scale).clamp(-fmax, fmax).to(fp8_dtype)


# ---------------------------------------------------------------- tensorwise
def cast_with_amax(x_hp: torch.Tensor, scale: torch.Tensor, fp8_dtype: torch.dtype,
                   with_transpose: bool = False):
    """Delayed-scaling cast: (x_fp8 [M,K], x_fp8_t [K,M] or None, amax fp32 [1])."""
    check_input(x_hp)
    check_scale(scale, x_hp)
    x_fp8 = saturating_cast(x_hp, scale.reshape(()), fp8_dtype)
    x_fp8_t = x_fp8.t().contiguous() if with_transpose else None
    return x_fp8, x_fp8_t, abs_max(x_hp).reshape(1)


def delayed_cast(x_hp: torch.Tensor, scale: torch.Tensor, amax_slot: torch.Tensor | None,
                 fp8_dtype: torch.dtype, with_transpose: bool = False):
    """The delayed-scaling cast as a layer uses it: (x_fp8, x_fp8_t or None, scale_inv fp32 [1]).

    `amax_slot` is slot 0 of the caster's amax history (an FP32 [1] view, >= 0 or NaN): this
    cast's amax is max-accumulated into it in place (NaN wins, so the update keeps the old scale).
    None records nothing (evaluation activations). scale_inv = 1 / scale, a fresh tensor.
    """
    x_fp8, x_fp8_t, amax = cast_with_amax(x_hp, scale, fp8_dtype, with_transpose)
    if amax_slot is not None:
        check_amax_slot(amax_slot, x_hp)
        amax_slot.copy_(torch.maximum(amax_slot, amax))
    return x_fp8, x_fp8_t, reciprocal(scale.reshape(1))


def check_amax_slot(amax_slot: torch.Tensor, x_hp: torch.Tensor) -> None:
    if amax_slot.dtype != torch.float32 or amax_slot.shape != (1,) or amax_slot.device != x_hp.device:
        raise ValueError(f"amax_slot must be a float32 [1] tensor on {x_hp.device} (history[0:1]), "
                         f"got {amax_slot.dtype} shape {tuple(amax_slot.shape)} on {amax_slot.device}")


def current_cast(x_hp: torch.Tensor, fp8_dtype: torch.dtype, power_of_2: bool = False,
                 with_transpose: bool = False):
    """Current (dynamic) tensorwise scaling: (x_fp8, x_fp8_t or None, scale_inv fp32 [1])."""
    check_input(x_hp)
    scale = scale_from_amax(abs_max(x_hp).reshape(1), fp8_max(fp8_dtype), power_of_2)
    x_fp8 = saturating_cast(x_hp, scale, fp8_dtype)
    x_fp8_t = x_fp8.t().contiguous() if with_transpose else None
    return x_fp8, x_fp8_t, reciprocal(scale)


# ---------------------------------------------------------------- blockwise
def quantize_1x128(x_hp: torch.Tensor, fp8_dtype: torch.dtype, power_of_2: bool = False):
    """One scale per 1x128 tile along K: (q [M,K], scale_inv [M, K/128] with strides (1, M))."""
    check_input(x_hp)
    M, K = x_hp.shape
    check_multiple_of_block(x_hp, 1, "K", "quantize_1x128")
    tiles = x_hp.float().view(M, K // BLOCK, BLOCK)  # [M, K/128, 128]
    scale = scale_from_amax(abs_max(tiles, dim=-1), fp8_max(fp8_dtype), power_of_2)  # [M, K/128]
    q = saturating_cast(tiles, scale.unsqueeze(-1), fp8_dtype).view(M, K)
    scale_inv = torch.empty(K // BLOCK, M, dtype=torch.float32, device=x_hp.device).t()
    scale_inv.copy_(reciprocal(scale))  # column-major (M, K/128): what scaled_mm wants
    return q, scale_inv


def quantize_1x128_t(x_hp: torch.Tensor, fp8_dtype: torch.dtype, power_of_2: bool = False):
    """1x128 tiles of x^T (128x1 tiles of x): (q_t [K,M], scale_inv [K, M/128] strides (1, K))."""
    check_input(x_hp)
    check_multiple_of_block(x_hp, 0, "M", "quantize_1x128_t")
    return quantize_1x128(x_hp.t().contiguous(), fp8_dtype, power_of_2)


def quantize_1x128_both(x_hp: torch.Tensor, fp8_dtype: torch.dtype, power_of_2: bool = False):
    """Both operands from one x: (q, scale_inv, q_t, scale_inv_t) as the two functions above."""
    check_input(x_hp)
    check_multiple_of_block(x_hp, 0, "M", "quantize_1x128_both")
    check_multiple_of_block(x_hp, 1, "K", "quantize_1x128_both")
    q, scale_inv = quantize_1x128(x_hp, fp8_dtype, power_of_2)
    q_t, scale_inv_t = quantize_1x128_t(x_hp, fp8_dtype, power_of_2)
    return q, scale_inv, q_t, scale_inv_t


def quantize_128x128(w_hp: torch.Tensor, fp8_dtype: torch.dtype, power_of_2: bool = False):
    """One scale per 128x128 block: (q [N,K], scale_inv [N/128, K/128] contiguous)."""
    check_input(w_hp, "w_hp")
    N, K = w_hp.shape
    check_multiple_of_block(w_hp, 0, "N", "quantize_128x128")
    check_multiple_of_block(w_hp, 1, "K", "quantize_128x128")
    blocks = w_hp.float().view(N // BLOCK, BLOCK, K // BLOCK, BLOCK)  # [N/128, 128, K/128, 128]
    scale = scale_from_amax(abs_max(blocks, dim=(1, 3)), fp8_max(fp8_dtype), power_of_2)
    q = saturating_cast(blocks, scale[:, None, :, None], fp8_dtype).view(N, K)
    return q, reciprocal(scale)


def quantize_128x128_both(w_hp: torch.Tensor, fp8_dtype: torch.dtype, power_of_2: bool = False):
    """W and W^T from one quantization: (q [N,K], scale_inv [N/128, K/128], q_t [K,N],
    scale_inv_t [K/128, N/128]), all contiguous. A 128x128 block of W is one of W^T, same scale."""
    q, scale_inv = quantize_128x128(w_hp, fp8_dtype, power_of_2)
    return q, scale_inv, q.t().contiguous(), scale_inv.t().contiguous()


# ---------------------------------------------------------------- delayed scaling
def check_delayed_args(amax_history, scale, scale_inv, fmax, algo) -> None:
    if algo not in DELAYED_ALGOS:
        raise ValueError(f"algo must be one of {DELAYED_ALGOS}, got {algo!r}")
    if amax_history.dim() != 2 or not amax_history.is_contiguous():
        raise ValueError(f"amax_history must be a contiguous [L, H] tensor, got {tuple(amax_history.shape)}")
    L = amax_history.shape[0]
    for name, t in (("amax_history", amax_history), ("scale", scale), ("scale_inv", scale_inv), ("fmax", fmax)):
        if t.dtype != torch.float32 or t.device != amax_history.device:
            raise ValueError(f"{name} must be float32 on {amax_history.device}, got {t.dtype} on {t.device}")
        if t is not amax_history and (t.shape != (L,) or not t.is_contiguous()):
            raise ValueError(f"{name} must be a contiguous [{L}] tensor, got shape {tuple(t.shape)}")


def delayed_scaling_update(amax_history: torch.Tensor, scale: torch.Tensor, scale_inv: torch.Tensor,
                           fmax: torch.Tensor, margin: float = 0.0, algo: str = "max") -> None:
    """Transformer Engine DelayedScaling update of L tensors at once, in place.

    amax = max of each history row ("max") or its slot 0 ("most_recent"), read before the roll;
    scale = fmax / amax / 2**margin where amax is finite and > 0, else the old scale; an infinite
    scale becomes FLT_MAX; scale_inv = 1 / scale; then each row rolls left by one and slot 0 = 0.
    """
    check_delayed_args(amax_history, scale, scale_inv, fmax, algo)
    if amax_history.numel() == 0:
        return
    amax = amax_history.amax(dim=1) if algo == "max" else amax_history[:, 0]  # NaN propagates
    ok = torch.isfinite(amax) & (amax > 0)
    divisor = torch.full_like(amax, 2.0**margin)
    new_scale = torch.div(torch.div(fmax, torch.where(ok, amax, 1.0)), divisor)
    new_scale = torch.where(ok, new_scale, scale)
    new_scale = torch.where(torch.isinf(new_scale), FLT_MAX, new_scale)
    scale.copy_(new_scale)
    scale_inv.copy_(reciprocal(new_scale))
    amax_history.copy_(torch.roll(amax_history, -1, dims=1))
    amax_history[:, 0] = 0.0
