"""The FP8 grouped (MoE expert) linear: all three GEMMs of all experts, one grouped call each.

Tokens arrive sorted by expert: X [T, K] is E contiguous row groups X_e, `group_sizes` [E] on the
device; W [E, N, K] holds one weight per expert. For every expert e:

    output       Y_e  [T_e, N] = X_e_rows  . W_e_rows^T       contracts K      experts form
    grad_input   dX_e [T_e, K] = dY_e_rows . W_e_cols^T       contracts N      experts form
    grad_weight  dW_e [N, K]   = dY_e_cols . X_e_cols^T       contracts T_e    tokens form

each family ONE call of the layer's GEMM backend for all experts (grouped_gemm.py: the Triton
grouped kernels on the GPU, any E4M3/E5M2 pair; an FP32 emulation elsewhere). The group offsets
are cumsum(group_sizes) on the device: no host sync, no Python loop over experts, static shapes
(grouped_layout.py), so torch.compile traces the layer whole and a CUDA graph captures it.

Operands, cast once per tensor for all experts. Rows (the experts form's `a`) are always ragged;
the token-major copies (the tokens form's operands) follow `layer.tokens_align` (grouped_layout.py):
  * tensorwise (delayed, current; any format pair): one scale per tensor, as in the dense layer.
    Ragged (tokens_align None): X and dY cast with their transposed copy in one kernel (T padded
    to 16 at the end). Padded (tokens_align 128, the kernel backend's default): rows cast alone,
    then their FP8 codes permuted into the padded token-major layout (grouped_dispatch.token_major:
    a byte move, exact with one scale), so grad_weight runs on 128-aligned groups through TMA.
    The weight: one cast of W [E*N, K] with its transposed copy, viewed per expert
    (grouped_gemm.stack_weight), cached per optimizer step.
  * blockwise (DeepSeek-V3): 1x128 row tiles of X and dY, ragged; their 128x1 token tiles (the
    grad_weight operands) cast in the padded layout, every expert's tokens on 128-aligned columns;
    128x128 weight blocks viewed per expert like the tensorwise weight.
The input may come pre-cast (`pre_rows` / `pre_cols`: FP8 operands quantized before dispatch,
grouped_dispatch.py); then `x` is only autograd's stand-in and is never read.

Saved for backward: the FP8 X_cols (data + scales) and the device offsets, never high-precision X;
the expert weights' FP8 copies come from the layer's cache in eager mode. Under torch.compile (no
cache) W itself is saved (a parameter, alive anyway) and backward re-derives W^T from it bit for
bit, as the dense layer does: no FP8 copy of the experts lives from forward to backward. Rowwise recipes and percentile-clipped
inputs keep the per-expert path (grouped_per_expert.py).
"""

from __future__ import annotations

import torch

from fp8train.numerics.grouped_dispatch import token_major
from fp8train.numerics.grouped_layout import (PaddedGroups, group_ends, pad_rows_to, padded_groups, scatter_rows,
                                              token_pad)
from fp8train.quant.tensor import QuantizedTensor


def cast_tokens(caster, x: torch.Tensor, need_cols: bool, groups: PaddedGroups | None):
    """(rows [T, K] ragged, cols or None) of sorted tokens x [T, K] as `caster` quantizes them; cols
    in the padded layout `groups`, or ragged when it is None (tensorwise only).

    Tensorwise ragged: one cast with its transposed copy [K, token_pad(T)]. Tensorwise padded: the
    rows' codes permuted to [K, groups.rows]. Tile scales: cols (128x1 token tiles) cast on the
    padded layout."""
    tokens = x.shape[0]
    if not caster.scheme.granularity.transposable:
        rows, _ = caster.cast(x, need_cols=False)
        return rows, (caster.cast_cols(scatter_rows(x, groups)) if need_cols else None)
    if groups is None or not need_cols:
        rows, cols = caster.cast(pad_rows_to(x, token_pad(tokens)) if need_cols else x, need_cols=need_cols)
        return QuantizedTensor(rows.data[:tokens], rows.scale_inv, rows.granularity, rows.fmt), cols
    rows, _ = caster.cast(x, need_cols=False)
    return rows, QuantizedTensor(token_major(rows.data, groups), rows.scale_inv, rows.granularity, rows.fmt)


def token_layout(layer, group_sizes: torch.Tensor, tokens: int):
    """(offs of the ragged rows, padded groups of the token-major operands or None)."""
    align = layer.tokens_align
    return group_ends(group_sizes), (None if align is None else padded_groups(group_sizes, tokens, align))


class FP8GroupedLinearFunction(torch.autograd.Function):
    """Y = concat_e(X_e W_e^T); `layer` is the FP8GroupedLinear supplying casters, cache, backend."""

    @staticmethod
    def forward(ctx, x, weight, group_sizes, layer, need_grad_weight: bool, pre_rows_data=None, pre_rows_scale=None,
                pre_cols_data=None, pre_cols_scale=None):
        # need_grad_weight: grad mode on and the weight trainable, decided by the caller (inside
        # forward grad mode is off, and ctx.needs_input_grad ignores it)
        ctx.layer, ctx.x_dtype, ctx.w_dtype, ctx.tokens = layer, x.dtype, weight.dtype, x.shape[0]
        ctx.need_grad_weight = need_grad_weight
        offs, padded = token_layout(layer, group_sizes, x.shape[0])
        caster = layer.input_caster
        if pre_rows_data is None:
            x_rows, x_cols = cast_tokens(caster, x, ctx.need_grad_weight, padded)
        else:
            x_rows = QuantizedTensor(pre_rows_data, pre_rows_scale, caster.scheme.granularity, caster.fmt)
            x_cols = None if pre_cols_data is None else QuantizedTensor(  # no cols scale: the rows' one
                pre_cols_data, pre_rows_scale if pre_cols_scale is None else pre_cols_scale,
                caster.scheme.granularity, caster.fmt)
        ctx.recast_weight = layer.recasts_weight_cols()  # compiled: W saved, W^T re-derived in backward
        w_rows, w_cols = layer.fp8_weights(need_cols=not ctx.recast_weight)
        y = layer.backend.grouped_mm_experts(x_rows, w_rows, offs, layer.output_dtype(x.dtype), "output")
        ctx.w_cols, ctx.x_meta = w_cols, (x_rows.granularity, x_rows.fmt)  # weight FP8: the layer caches it
        saved = (x_cols.data, x_cols.scale_inv) if ctx.need_grad_weight else (None, None)
        ctx.padded_meta = None if padded is None else (padded.rows, padded.align)
        layout = (padded.offs, padded.dest_rows, padded.row_of) if padded else (None, None, None)
        ctx.save_for_backward(*saved, offs, *layout, weight if ctx.recast_weight else None)
        return y

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        layer = ctx.layer
        x_data, x_scale_inv, offs, padded_offs, dest_rows, row_of, weight = ctx.saved_tensors
        padded = None if ctx.padded_meta is None else PaddedGroups(padded_offs, dest_rows, row_of, *ctx.padded_meta)
        dy_rows, dy_cols = cast_tokens(layer.grad_output_caster, grad_y.contiguous(), ctx.need_grad_weight, padded)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            w_cols = layer.recast_weight_cols(weight) if ctx.recast_weight else ctx.w_cols
            grad_x = layer.backend.grouped_mm_experts(dy_rows, w_cols, offs, ctx.x_dtype, "grad_input")
        if ctx.need_grad_weight:
            x_cols = QuantizedTensor(x_data, x_scale_inv, *ctx.x_meta)
            token_offs = offs if padded is None else padded.offs
            grad_w = layer.backend.grouped_mm_tokens(dy_cols, x_cols, token_offs, ctx.w_dtype,
                                                     groups_aligned=padded is not None)
        return grad_x, grad_w, None, None, None, None, None, None, None

