"""What every kernel computes, in the kernel's own layouts, through the core's reference quantizers.

The numerics live in ONE place, `fp8train.quant.reference` and `fp8train.quant.scaling` (the
saturating cast, the current-scale rule, the delayed update). This module only adds what is the
kernels' business: argument checks that name the bad argument, and the output layouts the GEMMs
want (e.g. 1x128 tile scales "outer-dimension major": shape (M, K/128), strides (1, M)). It is
the implementation off CUDA and the oracle the Triton kernels are tested against, bit for bit.
"""

from __future__ import annotations

import torch

from fp8train.quant import reference as core
from fp8train.quant.formats import FP8_FORMATS, format_of_dtype
from fp8train.quant.granularity import Granularity
from fp8train.quant.scaling import DELAYED_ALGOS, delayed_scale_update, reciprocal, scale_from_amax, tensor_amax
from fp8train.quant.schemes import BLOCK

HP_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
FP8_MAX = {fmt.dtype: fmt.max for fmt in FP8_FORMATS}
CAST_TILE = (32, 128)  # rows x columns of one program of the tensorwise cast kernel (kernels/tensorwise.py)
NAN_BITS = 0x7FC00000  # the canonical NaN: as an int32 it is above +inf's bits, so max() keeps it


def amax_tile_count(m: int, k: int) -> int:
    """Programs of the tensorwise cast of an [m, k] tensor: one per CAST_TILE tile."""
    return -(-m // CAST_TILE[0]) * -(-k // CAST_TILE[1])


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
        raise ValueError(f"scale must be a float32 tensor of one element on {x_hp.device}, "
                         f"got {scale.dtype} shape {tuple(scale.shape)} on {scale.device}")


def check_amax_slot(amax_slot: torch.Tensor, x_hp: torch.Tensor) -> None:
    if amax_slot.dtype != torch.float32 or amax_slot.shape != (1,) or amax_slot.device != x_hp.device:
        raise ValueError(f"amax_slot must be a float32 [1] tensor on {x_hp.device} (history[0:1]), "
                         f"got {amax_slot.dtype} shape {tuple(amax_slot.shape)} on {amax_slot.device}")


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


def _fmt(fp8_dtype: torch.dtype):
    fp8_max(fp8_dtype)
    return format_of_dtype(fp8_dtype)


# ---------------------------------------------------------------- tensorwise
def _amax(x_hp: torch.Tensor) -> torch.Tensor:
    """FP32 [1] max |x| (NaN propagates); 0 for an empty tensor."""
    if x_hp.numel() == 0:
        return torch.zeros(1, dtype=torch.float32, device=x_hp.device)
    return tensor_amax(x_hp).reshape(1)


def cast_with_amax(x_hp: torch.Tensor, scale: torch.Tensor, fp8_dtype: torch.dtype, with_transpose: bool = False):
    """Delayed-scaling cast: (x_fp8 [M,K], x_fp8_t [K,M] or None, amax fp32 [1])."""
    check_input(x_hp)
    check_scale(scale, x_hp)
    x_fp8 = core.float_codes(x_hp, scale.reshape(()), _fmt(fp8_dtype))
    return x_fp8, (x_fp8.t().contiguous() if with_transpose else None), _amax(x_hp)


def amax_bits(amax: torch.Tensor) -> torch.Tensor:
    """FP32 amaxes (>= 0 or NaN) as int32 bit patterns whose max is the max amax, NaN above all."""
    return torch.where(amax.isnan(), NAN_BITS, amax.view(torch.int32))


def cast_with_amax_tiles(x_hp: torch.Tensor, scale: torch.Tensor, fp8_dtype: torch.dtype,
                         with_transpose: bool = False):
    """`cast_with_amax` with the amax as the kernel leaves it: int32 bits of each tile's amax
    [amax_tile_count]; here the whole amax in entry 0 and zeros (0.0) elsewhere: the same max."""
    x_fp8, x_fp8_t, amax = cast_with_amax(x_hp, scale, fp8_dtype, with_transpose)
    tiles = torch.zeros(amax_tile_count(*x_hp.shape), dtype=torch.int32, device=x_hp.device)
    tiles[:1] = amax_bits(amax)
    return x_fp8, x_fp8_t, tiles


def delayed_cast(x_hp: torch.Tensor, scale: torch.Tensor, amax_slot: torch.Tensor | None,
                 fp8_dtype: torch.dtype, with_transpose: bool = False):
    """The delayed cast as a layer uses it: (x_fp8, x_fp8_t or None, scale_inv fp32 [1]); this
    cast's amax is max-accumulated into `amax_slot` (history[0:1]; NaN wins) unless it is None."""
    x_fp8, x_fp8_t, amax = cast_with_amax(x_hp, scale, fp8_dtype, with_transpose)
    if amax_slot is not None:
        check_amax_slot(amax_slot, x_hp)
        amax_slot.copy_(torch.maximum(amax_slot, amax))
    return x_fp8, x_fp8_t, reciprocal(scale.reshape(1))


def current_cast(x_hp: torch.Tensor, fp8_dtype: torch.dtype, power_of_2: bool = False, with_transpose: bool = False):
    """Current (dynamic) tensorwise scaling: (x_fp8, x_fp8_t or None, scale_inv fp32 [1])."""
    check_input(x_hp)
    scale = scale_from_amax(_amax(x_hp), fp8_max(fp8_dtype), power_of_2)
    x_fp8 = core.float_codes(x_hp, scale, _fmt(fp8_dtype))
    return x_fp8, (x_fp8.t().contiguous() if with_transpose else None), reciprocal(scale)


# ---------------------------------------------------------------- blockwise
def _outer_major(scale_inv: torch.Tensor) -> torch.Tensor:
    """Same values, column-major storage: shape (R, C), strides (1, R), as scaled_mm wants tiles."""
    return scale_inv.t().contiguous().t()


def quantize_1x128(x_hp: torch.Tensor, fp8_dtype: torch.dtype, power_of_2: bool = False):
    """One scale per 1x128 tile along K: (q [M,K], scale_inv [M, K/128] with strides (1, M))."""
    check_input(x_hp)
    check_multiple_of_block(x_hp, 1, "K", "quantize_1x128")
    q = core.quantize(x_hp, _fmt(fp8_dtype), Granularity.tile(BLOCK), power_of_2=power_of_2)
    return q.data, _outer_major(q.scale_inv)


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
    return (*quantize_1x128(x_hp, fp8_dtype, power_of_2), *quantize_1x128_t(x_hp, fp8_dtype, power_of_2))


def quantize_128x128(w_hp: torch.Tensor, fp8_dtype: torch.dtype, power_of_2: bool = False):
    """One scale per 128x128 block: (q [N,K], scale_inv [N/128, K/128] contiguous)."""
    check_input(w_hp, "w_hp")
    check_multiple_of_block(w_hp, 0, "N", "quantize_128x128")
    check_multiple_of_block(w_hp, 1, "K", "quantize_128x128")
    q = core.quantize(w_hp, _fmt(fp8_dtype), Granularity.block(BLOCK), power_of_2=power_of_2)
    return q.data, q.scale_inv


def quantize_128x128_both(w_hp: torch.Tensor, fp8_dtype: torch.dtype, power_of_2: bool = False):
    """W and W^T from one quantization: (q [N,K], scale_inv [N/128, K/128], q_t [K,N],
    scale_inv_t [K/128, N/128]), all contiguous. A 128x128 block of W is one of W^T, same scale."""
    q, scale_inv = quantize_128x128(w_hp, fp8_dtype, power_of_2)
    # clone: a [N/128, 1] grid's transpose is already contiguous, and a custom operator's outputs
    # must not alias each other (torch.compile rejects it)
    t = torch.contiguous_format
    return q, scale_inv, q.t().clone(memory_format=t), scale_inv.t().clone(memory_format=t)


# ---------------------------------------------------------------- MoE dispatch of FP8 rows
def check_gather_rows(data: torch.Tensor, index: torch.Tensor | None, cols: int,
                      col_rows: torch.Tensor | None = None) -> None:
    if data.dim() != 2 or data.element_size() != 1 or (data.numel() and data.stride(1) != 1):
        raise ValueError(f"data must be a 2-D 1-byte tensor (FP8 codes) with inner stride 1, got {data.dtype} "
                         f"{tuple(data.shape)} strides {data.stride()}")
    for name, t in (("index", index), ("col_rows", col_rows)):
        if t is not None and (t.dim() != 1 or t.dtype != torch.int64 or t.device != data.device):
            raise ValueError(f"{name} must be None or int64 [n] on {data.device}, got {t.dtype} {tuple(t.shape)} "
                             f"on {t.device}")
    rows = data.shape[0] if index is None else index.shape[0]
    if col_rows is None and cols and cols < rows:
        raise ValueError(f"cols={cols} must be 0 (no transpose) or >= the {rows} gathered rows")
    if col_rows is not None and col_rows.shape[0] != cols:
        raise ValueError(f"col_rows has {col_rows.shape[0]} entries but cols={cols}: one source row per column")


def gather_rows(data: torch.Tensor, index: torch.Tensor | None, cols: int = 0, col_rows: torch.Tensor | None = None):
    """(data[index] [T, K] or an empty [0] tensor when index is None, the transpose [K, cols] or an
    empty [0] tensor if cols == 0): column c holds row col_rows[c] (zeros where < 0), or without
    col_rows row c for c < T and zeros past T (kernels/permute.py)."""
    src = data.view(torch.uint8)
    rows = src if index is None else src.index_select(0, index)
    rows_out = data.new_empty((0,)) if index is None else rows.view(data.dtype)
    if not cols:
        return rows_out, data.new_empty((0,))
    if col_rows is None:
        padded = torch.cat([rows, rows.new_zeros(cols - rows.shape[0], rows.shape[1])])
    else:  # a zero row appended at index T: padding columns read it
        source = torch.where(col_rows < 0, rows.shape[0], col_rows)
        padded = torch.cat([rows, rows.new_zeros(1, rows.shape[1])]).index_select(0, source)
    return rows_out, padded.t().contiguous().view(data.dtype)


# ---------------------------------------------------------------- delayed scaling
def delayed_scaling_update(amax_history: torch.Tensor, scale: torch.Tensor, scale_inv: torch.Tensor,
                           fmax: torch.Tensor, margin: float = 0.0, algo: str = "max") -> None:
    """The core's DelayedScaling update of L tensors at once, in place (fp8train.quant.scaling)."""
    check_delayed_args(amax_history, scale, scale_inv, fmax, algo)
    if amax_history.numel() == 0:
        return
    history, new_scale, new_scale_inv = delayed_scale_update(amax_history, scale, fmax, margin, algo)
    scale.copy_(new_scale)
    scale_inv.copy_(new_scale_inv)
    amax_history.copy_(history)


# ---------------------------------------------------------------- MoE combine (kernels/moe_combine.py)
def check_combine(y: torch.Tensor, weight: torch.Tensor, pos: torch.Tensor) -> None:
    if y.dim() != 2 or weight.dim() != 2 or pos.dim() != 1:
        raise ValueError(f"combine_rows takes y [M, D], weight [N, k] and pos [N * k], got shapes "
                         f"{tuple(y.shape)}, {tuple(weight.shape)}, {tuple(pos.shape)}")
    if pos.numel() != weight.numel() or pos.dtype != torch.int64:
        raise ValueError(f"pos must be int64 [N * k = {weight.numel()}], got {pos.dtype} {tuple(pos.shape)}")
    if y.stride(1) != 1 or not weight.is_contiguous() or not pos.is_contiguous():
        raise ValueError("combine_rows needs row-major y (inner stride 1) and contiguous weight and pos")
    if not (y.device == weight.device == pos.device):
        raise ValueError(f"y, weight and pos must share a device, got {y.device}, {weight.device}, {pos.device}")


def _slot_rows(y: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(y rows per assignment [N * k, D] FP32 with dropped slots zero, live mask [N * k])."""
    live = pos >= 0
    if y.shape[0] == 0:  # every assignment dropped (capacity 0): nothing to read
        return y.new_zeros(pos.shape[0], y.shape[1], dtype=torch.float32), live
    rows = y.float().index_select(0, pos.clamp(min=0))
    return rows * live[:, None], live


def combine_rows(y: torch.Tensor, weight: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """out[n] = sum_j weight[n, j] * y[pos[n * k + j]] in FP32, y's dtype (the gather form)."""
    rows, _ = _slot_rows(y, pos)
    n, k = weight.shape
    return (rows.view(n, k, -1) * weight.float()[..., None]).sum(1).to(y.dtype)


def combine_rows_backward(grad_out: torch.Tensor, y: torch.Tensor, weight: torch.Tensor,
                          pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_y [M, D] in y's dtype, grad_weight [N * k] FP32)."""
    rows, live = _slot_rows(y, pos)
    n, k = weight.shape
    g = grad_out.float().repeat_interleave(k, dim=0)  # [N * k, D]: assignment n * k + j reads token n
    grad_w = (g * rows).sum(1)
    grad_y = torch.zeros_like(y)
    grad_y[pos[live]] = (g[live] * weight.float().reshape(-1)[live, None]).to(y.dtype)
    return grad_y, grad_w


def sum_rows_by_token(grad_rows: torch.Tensor, token_index: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """The backward of x[token_index]: rows of the same token summed in FP32, as the kernel sums."""
    acc = torch.promote_types(grad_rows.dtype, torch.float32)
    out = grad_rows.new_zeros(num_tokens, grad_rows.shape[1], dtype=acc)
    torch.ops.aten._index_put_impl_(out, (token_index,), grad_rows.to(acc), True, True)
    return out.to(grad_rows.dtype)
