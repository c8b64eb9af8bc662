"""The FP8 grouped (MoE expert) linear: all three GEMMs of every expert in FP8, FP32 accumulation.

Tokens arrive sorted by expert: X [T, K] is E contiguous row groups X_e with `group_sizes` [E];
W [E, N, K] holds one weight per expert. For every expert e:

    output       Y_e  [T_e, N] = X_e_rows  . W_e_rows^T       contracts K
    grad_input   dX_e [T_e, K] = dY_e_rows . W_e_cols^T       contracts N
    grad_weight  dW_e [N, K]   = dY_e_cols . X_e_cols^T       contracts T_e (this expert's tokens)

Aligned groups (tensorwise and blockwise recipes): the tokens are scattered into one padded
buffer where every expert's group starts at a multiple of 16 (128 for blockwise) rows, and X and
dY are each quantized ONCE for all experts; grouped_layout.py explains the layout and why.
Outputs come back as one torch.cat of each expert's real rows (no padded output, no per-expert
copy, no gather); grad_weight is one torch.stack of per-expert GEMMs, each accumulated in FP32 and
rounded once to the weight's dtype.

Grouped GEMMs. That loop costs one GEMM launch (tens of microseconds of host time) per expert and
GEMM. Where grouped_gemm.plan_grouped_gemms allows it (scaled_mm backend on Hopper, E4M3 x E4M3,
BF16 output), a GEMM family instead runs as ONE torch._scaled_grouped_mm over the padded buffer
(grouped_gemm.py explains the operand and scale layouts); the others keep the loop. The layout then
gives an expert without tokens 16 zero rows: torch's kernel cannot contract over zero tokens.

Scales. Tensorwise rows and cols share the whole tensor's scale (delayed: the layer's scale, as
before; current: the amax of all tokens, as in the dense layer). Blockwise tiles are those of
per-expert quantization. Rowwise recipes, and inputs with percentile clipping (padding zeros
would move a percentile), keep the per-expert path: rows quantized once and sliced, the
token-major cols quantized per expert group, the per-expert outputs copied into place.
The FP8 operands are those of the per-expert path bit for bit (tests check it); the GEMMs see the
padded shapes, so on the emulated backend CPU BLAS may sum in another order (last FP32 bit).

Saved for backward: the padded FP8 X_cols (data + scales) and the [T] row index, never
high-precision X; the expert weights' FP8 copies come from the layer's cache.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from fp8train.numerics.grouped_gemm import group_offsets, grouped_mm_experts, grouped_mm_tokens, plan_grouped_gemms
from fp8train.numerics.grouped_layout import (AlignedGroups, align_groups, gather_real_rows, scatter_to_padded,
                                              take_real_rows)
from fp8train.numerics.linear_function import pad_tokens
from fp8train.quant.tensor import QuantizedTensor

class FP8GroupedLinearFunction(torch.autograd.Function):
    """Y = concat_e(X_e W_e^T); `layer` is the FP8GroupedLinear supplying casters, cache, backend."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, group_sizes: torch.Tensor, layer):
        sizes = [int(s) for s in group_sizes.tolist()]  # the one host sync
        if sum(sizes) != x.shape[0]:
            raise ValueError(f"group_sizes sum to {sum(sizes)} but the input has {x.shape[0]} rows")
        ctx.layer, ctx.x_dtype, ctx.w_dtype = layer, x.dtype, weight.dtype
        ctx.need_grad_weight = ctx.needs_input_grad[1]  # False under no_grad or for a frozen weight
        ctx.aligned = layer.group_align is not None
        if ctx.aligned:
            ctx.plan = plan_grouped_gemms(layer, x.dtype, weight.dtype, x.device)
            min_rows = layer.group_align if ctx.plan.any else 0
            return _aligned_forward(ctx, x, align_groups(group_sizes, sizes, layer.group_align, min_rows))
        return _per_expert_forward(ctx, x, sizes)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        grad_x, grad_w = (_aligned_backward if ctx.aligned else _per_expert_backward)(ctx, grad_y)
        return grad_x, grad_w, None, None


def _aligned_forward(ctx, x: torch.Tensor, groups: AlignedGroups) -> torch.Tensor:
    layer = ctx.layer
    x_rows, x_cols = layer.input_caster.cast(scatter_to_padded(x, groups), need_cols=ctx.need_grad_weight)
    w_rows, w_cols = layer.fp8_weights()
    ctx.offsets = group_offsets(groups.padded_sizes, x.device) if ctx.plan.any else None
    y = _expert_gemm(ctx, "output", x_rows, w_rows, groups, layer.output_dtype(x.dtype), layer.out_features, x)
    ctx.groups, ctx.w_cols = replace(groups, dest_rows=None), w_cols  # weight FP8: the layer caches it
    ctx.x_meta = (x_cols.fmt, x_cols.granularity) if x_cols is not None else None
    ctx.save_for_backward(*((x_cols.data, x_cols.scale_inv) if x_cols is not None else (None, None)),
                          groups.dest_rows)
    return y


def _aligned_backward(ctx, grad_y: torch.Tensor):
    layer = ctx.layer
    x_data, x_scale_inv, dest_rows = ctx.saved_tensors
    groups = replace(ctx.groups, dest_rows=dest_rows)
    dy_rows, dy_cols = layer.grad_output_caster.cast(scatter_to_padded(grad_y, groups),
                                                     need_cols=ctx.need_grad_weight)
    grad_x = grad_w = None
    if ctx.needs_input_grad[0]:
        grad_x = _expert_gemm(ctx, "grad_input", dy_rows, ctx.w_cols, groups, ctx.x_dtype, layer.in_features, grad_y)
    if ctx.need_grad_weight:
        x_cols = QuantizedTensor(x_data, x_scale_inv, ctx.x_meta[1], ctx.x_meta[0])
        if ctx.plan.grouped["grad_weight"]:
            grad_w = _token_gemm_grouped(dy_cols, x_cols, groups, ctx.offsets, ctx.w_dtype)
        else:
            grad_w = _token_gemm_loop(layer, dy_cols, x_cols, groups, ctx.w_dtype)
    return grad_x, grad_w


def _expert_gemm(ctx, gemm: str, a_rows: QuantizedTensor, b_experts: list[QuantizedTensor], groups: AlignedGroups,
                 out_dtype: torch.dtype, width: int, like: torch.Tensor) -> torch.Tensor:
    """output or grad_input, [T, width]: every expert's rows times its own weight operand."""
    if ctx.plan.grouped[gemm]:
        return _expert_gemm_grouped(ctx.layer, gemm, a_rows, b_experts, groups, ctx.offsets, out_dtype)
    return _expert_gemm_loop(ctx.layer, gemm, a_rows, b_experts, groups, out_dtype, width, like)


def _expert_gemm_loop(layer, gemm, a_rows, b_experts, groups, out_dtype, width, like) -> torch.Tensor:
    """One backend GEMM per non-empty expert on its padded rows (views), real rows concatenated."""
    outputs = [layer.backend.mm(a_rows.rows(start, padded), b_experts[e], out_dtype, gemm)
               for e, start, _, padded in groups.spans()]
    return gather_real_rows(outputs, groups, width, like, out_dtype)


def _expert_gemm_grouped(layer, gemm, a_rows, b_experts, groups, offsets, out_dtype) -> torch.Tensor:
    """All experts in one torch._scaled_grouped_mm; fast accumulation where the loop would use it."""
    fast = getattr(layer.backend, "fast_accum_output", False) and gemm == "output"
    return take_real_rows(grouped_mm_experts(a_rows, b_experts, offsets, out_dtype, fast), groups)


def _token_gemm_loop(layer, dy_cols: QuantizedTensor, x_cols: QuantizedTensor, groups: AlignedGroups, dtype) -> torch.Tensor:
    """grad_weight [E, N, K]: one backend GEMM per non-empty expert over its token columns."""
    per_expert = {e: layer.backend.mm(dy_cols.cols(start, padded), x_cols.cols(start, padded),
                                      dtype, "grad_weight")  # FP32 accumulation, one rounding
                  for e, start, _, padded in groups.spans()}
    return _stack_expert_grads(per_expert, len(groups.sizes), layer, dy_cols.data.device, dtype)


def _token_gemm_grouped(dy_cols: QuantizedTensor, x_cols: QuantizedTensor, groups: AlignedGroups, offsets, dtype) -> torch.Tensor:
    """grad_weight [E, N, K] in one torch._scaled_grouped_mm; experts without tokens are exact zeros."""
    grad_w = grouped_mm_tokens(dy_cols, x_cols, offsets, dtype)
    for e in (e for e, size in enumerate(groups.sizes) if size == 0):
        grad_w[e].zero_()  # its 16 zero rows gave 0 already, unless a scale was not finite
    return grad_w


def _stack_expert_grads(per_expert: dict[int, torch.Tensor], num_experts: int, layer, device, dtype):
    """[E, N, K] from the experts that had tokens; the others get exact zeros (one stack kernel)."""
    zeros = None
    if len(per_expert) < num_experts:
        zeros = torch.zeros(layer.out_features, layer.in_features, dtype=dtype, device=device)
    return torch.stack([per_expert.get(e, zeros) for e in range(num_experts)])


def _group_bounds(sizes: list[int]):
    start = 0
    for expert, size in enumerate(sizes):
        yield expert, start, size
        start += size


def _per_expert_forward(ctx, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Rowwise (and percentile-clipped) recipes: cols quantized per expert group."""
    layer = ctx.layer
    x_rows, _ = layer.input_caster.cast(x, need_cols=False)
    w_rows, w_cols = layer.fp8_weights()
    out_dtype = layer.output_dtype(x.dtype)
    y = x.new_empty(x.shape[0], layer.out_features, dtype=out_dtype)
    saved, cols_meta = [], None
    for e, start, size in _group_bounds(sizes):
        if size == 0:
            continue
        y[start:start + size] = layer.backend.mm(x_rows.rows(start, size), w_rows[e], out_dtype, "output")
        if ctx.need_grad_weight:
            x_cols = layer.input_caster.cast_cols(pad_tokens(x[start:start + size], layer.cols_token_multiple))
            saved += [x_cols.data, x_cols.scale_inv]
            cols_meta = (x_cols.fmt, x_cols.granularity)
    ctx.sizes, ctx.x_meta, ctx.w_cols = sizes, cols_meta, w_cols
    ctx.save_for_backward(*saved)
    return y


def _per_expert_backward(ctx, grad_y: torch.Tensor):
    layer, sizes = ctx.layer, ctx.sizes
    grad_y = grad_y.contiguous()
    dy_rows, _ = layer.grad_output_caster.cast(grad_y, need_cols=False)
    grad_x = torch.zeros(grad_y.shape[0], layer.in_features, dtype=ctx.x_dtype, device=grad_y.device)
    grad_w = torch.zeros(len(sizes), layer.out_features, layer.in_features, dtype=torch.float32,
                         device=grad_y.device) if ctx.need_grad_weight else None
    saved = iter(ctx.saved_tensors)
    for e, start, size in _group_bounds(sizes):
        if size == 0:
            continue
        dy_e = dy_rows.rows(start, size)
        grad_x[start:start + size] = layer.backend.mm(dy_e, ctx.w_cols[e], ctx.x_dtype, "grad_input")
        if grad_w is not None:
            fmt, gran = ctx.x_meta
            x_cols = QuantizedTensor(next(saved), next(saved), gran, fmt)
            dy_hp = pad_tokens(grad_y[start:start + size], layer.cols_token_multiple)
            grad_w[e] = layer.backend.mm(layer.grad_output_caster.cast_cols(dy_hp), x_cols, torch.float32,
                                         "grad_weight")
    grad_w = grad_w.to(ctx.w_dtype) if grad_w is not None else None
    return (grad_x if ctx.needs_input_grad[0] else None), grad_w
