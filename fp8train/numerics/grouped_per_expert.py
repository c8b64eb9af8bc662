"""The per-expert path of the FP8 grouped linear: rowwise recipes and percentile-clipped inputs.

Rowwise cols scales run per column over ONE expert's tokens, and a percentile amax counts
elements (padding zeros or other experts' tokens would move it), so these recipes quantize the
token-major operands per expert group: rows are quantized once and sliced, the cols quantized per
expert, and every GEMM is one backend call per non-empty expert. That needs the group sizes on the
host: one `tolist()` per forward, so the layer runs this path eagerly (a graph break under
torch.compile) and cannot be CUDA-graphed. Bit-identical to the dense FP8 layer applied to each
expert's rows alone (tests/numerics/test_grouped_aligned.py).
"""

from __future__ import annotations

import torch

from fp8train.numerics.linear_function import pad_tokens
from fp8train.quant.tensor import QuantizedTensor


def _group_bounds(sizes: list[int]):
    start = 0
    for expert, size in enumerate(sizes):
        yield expert, start, size
        start += size


class FP8PerExpertLinearFunction(torch.autograd.Function):
    """Y = concat_e(X_e W_e^T) with per-expert casts of the token-major operands."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, group_sizes: torch.Tensor, layer, need_grad_weight: bool):
        sizes = [int(s) for s in group_sizes.tolist()]  # the host sync of this path
        if sum(sizes) != x.shape[0]:
            raise ValueError(f"group_sizes sum to {sum(sizes)} but the input has {x.shape[0]} rows")
        ctx.layer, ctx.x_dtype, ctx.w_dtype = layer, x.dtype, weight.dtype
        ctx.need_grad_weight = need_grad_weight  # grad mode + trainable weight (the caller knows grad mode)
        x_rows, _ = layer.input_caster.cast(x, need_cols=False)
        w_rows, w_cols = layer.fp8_weights()
        out_dtype = layer.output_dtype(x.dtype)
        y = x.new_empty(x.shape[0], layer.out_features, dtype=out_dtype)
        saved, cols_meta = [], None
        for e, start, size in _group_bounds(sizes):
            if size == 0:
                continue
            y[start:start + size] = layer.backend.mm(x_rows.rows(start, size), w_rows.expert(e), out_dtype, "output")
            if ctx.need_grad_weight:
                x_cols = layer.input_caster.cast_cols(pad_tokens(x[start:start + size], layer.cols_token_multiple))
                saved += [x_cols.data, x_cols.scale_inv]
                cols_meta = (x_cols.fmt, x_cols.granularity)
        ctx.sizes, ctx.x_meta, ctx.w_cols = sizes, cols_meta, w_cols
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
        for e, start, size in _group_bounds(sizes):
            if size == 0:
                continue
            dy_e = dy_rows.rows(start, size)
            grad_x[start:start + size] = layer.backend.mm(dy_e, ctx.w_cols.expert(e), ctx.x_dtype, "grad_input")
            if grad_w is not None:
                fmt, gran = ctx.x_meta
                x_cols = QuantizedTensor(next(saved), next(saved), gran, fmt)
                dy_hp = pad_tokens(grad_y[start:start + size], layer.cols_token_multiple)
                grad_w[e] = layer.backend.mm(layer.grad_output_caster.cast_cols(dy_hp), x_cols, torch.float32,
                                             "grad_weight")
        grad_w = grad_w.to(ctx.w_dtype) if grad_w is not None else None
        return (grad_x if ctx.needs_input_grad[0] else None), grad_w, None, None, None
