"""The FP8 grouped (MoE expert) linear: all three GEMMs of every expert in FP8, FP32 accumulation.

Tokens arrive sorted by expert: X [T, K] is E contiguous row groups X_e with `group_sizes` [E];
W [E, N, K] holds one weight per expert. For every expert e:

    output       Y_e  [T_e, N] = X_e_rows  . W_e_rows^T       contracts K
    grad_input   dX_e [T_e, K] = dY_e_rows . W_e_cols^T       contracts N
    grad_weight  dW_e [N, K]   = dY_e_cols . X_e_cols^T       contracts T_e (this expert's tokens)

Rows-quantization is done ONCE for the whole X and dY (one amax record for delayed scaling, one
kernel for tiles) and then sliced per expert. The token-major `cols` operands of grad_weight are
quantized per expert group, zero-padded to a multiple of 128 tokens when tiles run along tokens
(DeepSeek-V3's 128x1 tiles must not straddle two experts). The weight is cast once per optimizer
step for all experts ([E*N, K] view: tensorwise shares one scale, 128x128 blocks and rows never
straddle experts because N % 128 == 0 is required for blockwise).

Native path: a per-expert loop over the same GEMM backend as the dense FP8 linear (emulated or
scaled_mm). Saved for backward: the per-expert FP8 X_e_cols and W_e_cols, never high-precision X.
"""

from __future__ import annotations

import torch

from fp8train.numerics.linear_function import pad_tokens
from fp8train.numerics.quantize import BLOCK, FP8Tensor


def slice_rows(t: FP8Tensor, start: int, size: int) -> FP8Tensor:
    """Rows [start, start+size) of a tensor-, row- or tile-scaled operand."""
    data = t.data[start:start + size]
    if t.granularity == "tensor":
        return FP8Tensor(data, t.scale_inv, "tensor", t.fmt)
    if t.granularity in ("row", "tile"):
        return FP8Tensor(data, t.scale_inv[start:start + size], t.granularity, t.fmt)
    assert start % BLOCK == 0 and size % BLOCK == 0, "block slices must be block aligned"
    return FP8Tensor(data, t.scale_inv[start // BLOCK:(start + size) // BLOCK], "block", t.fmt)


def _group_bounds(sizes: list[int]):
    start = 0
    for expert, size in enumerate(sizes):
        yield expert, start, size
        start += size


class FP8GroupedLinearFunction(torch.autograd.Function):
    """Y = concat_e(X_e W_e^T); `layer` is the FP8GroupedLinear supplying casters, cache, backend."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, group_sizes: torch.Tensor, layer):
        sizes = [int(s) for s in group_sizes.tolist()]
        x_rows, _ = layer.input_caster.cast(x, need_cols=False)
        w_rows, w_cols = layer.fp8_weights()
        out_dtype = layer.output_dtype(x.dtype)
        y = x.new_empty(x.shape[0], layer.out_features, dtype=out_dtype)
        saved, token_multiple, cols_meta = [], layer.cols_token_multiple, None
        for e, start, size in _group_bounds(sizes):
            if size == 0:
                continue
            y[start:start + size] = layer.backend.mm(slice_rows(x_rows, start, size), w_rows[e], out_dtype, "output")
            if ctx.needs_input_grad[1]:
                x_cols = layer.input_caster.cast_cols(pad_tokens(x[start:start + size], token_multiple))
                saved += [x_cols.data, x_cols.scale_inv]
                cols_meta = (x_cols.fmt, x_cols.granularity)
        ctx.layer, ctx.sizes, ctx.x_dtype, ctx.w_dtype = layer, sizes, x.dtype, weight.dtype
        ctx.x_meta = cols_meta
        ctx.need_grad_weight = ctx.needs_input_grad[1]
        ctx.w_cols = w_cols  # FP8 copies held by the layer's cache anyway; no high precision kept
        ctx.save_for_backward(*saved)
        return y

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        layer, sizes = ctx.layer, ctx.sizes
        grad_y = grad_y.contiguous()
        dy_rows, _ = layer.grad_output_caster.cast(grad_y, need_cols=False)
        grad_x = torch.zeros(grad_y.shape[0], layer.in_features, dtype=ctx.x_dtype, device=grad_y.device)
        grad_w = torch.zeros(len(sizes), layer.out_features, layer.in_features, dtype=torch.float32,
                             device=grad_y.device) if ctx.need_grad_weight else None
        saved = iter(ctx.saved_tensors)
        fmt, gran = ctx.x_meta
        for e, start, size in _group_bounds(sizes):
            if size == 0:
                continue
            dy_e = slice_rows(dy_rows, start, size)
            grad_x[start:start + size] = layer.backend.mm(dy_e, ctx.w_cols[e], ctx.x_dtype, "grad_input")
            if grad_w is not None:
                x_cols = FP8Tensor(next(saved), next(saved), gran, fmt)
                dy_hp = pad_tokens(grad_y[start:start + size], layer.cols_token_multiple)
                dy_cols = layer.grad_output_caster.cast_cols(dy_hp)
                grad_w[e] = layer.backend.mm(dy_cols, x_cols, torch.float32, "grad_weight")
        grad_w = grad_w.to(ctx.w_dtype) if grad_w is not None else None
        return (grad_x if ctx.needs_input_grad[0] else None), grad_w, None, None
