"""The FP8 linear layer's autograd function: all three GEMMs in FP8 with FP32 accumulation.

For Y = X W^T + b with X [M, K] (M tokens), W [N, K]:

    output       Y  [M, N] = X_rows  [M, K] . W_rows  [N, K]^T      contracts K
    grad_input   dX [M, K] = dY_rows [M, N] . W_cols  [K, N]^T      contracts N
    grad_weight  dW [N, K] = dY_cols [N, M] . X_cols  [K, M]^T      contracts M (tokens)

`_rows` is an operand quantized along its stored last dimension, `_cols` its quantized transpose
(see role_caster.py). Each GEMM accumulates in FP32 and writes the output dtype (the input's dtype, or
as the recipe says); dW is produced in the weight's dtype for DeepSpeed's FP32 accumulation.

Saved for backward: X_cols (FP8 data + FP32 scales) and W_cols, never the high-precision X.
The bias gradient is dY summed over tokens in high precision.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fp8train.quant.tensor import QuantizedTensor


def pad_tokens(x2d: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad the token dimension up to a multiple (zero rows add nothing to any GEMM)."""
    extra = (-x2d.shape[0]) % multiple
    return F.pad(x2d, (0, 0, 0, extra)) if extra else x2d


class FP8LinearFunction(torch.autograd.Function):
    """Y = X W^T + b with FP8 GEMMs; `layer` is the FP8Linear supplying casters, cache and backend."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, layer):
        tokens = x.shape[:-1]
        x2d = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])  # [M, K]
        m = x2d.shape[0]
        if layer.token_multiple > 1:
            x2d = pad_tokens(x2d, layer.token_multiple)
        need_grad_weight = ctx.needs_input_grad[1]  # False under no_grad or for a frozen weight
        x_rows, x_cols = layer.input_caster.cast(x2d, need_cols=need_grad_weight)
        w_rows, w_cols = layer.fp8_weight()
        out_dtype = layer.output_dtype(x.dtype)
        y = layer.backend.mm(x_rows, w_rows, out_dtype, gemm="output")  # [M (padded), N]
        if y.shape[0] != m:
            y = y[:m]
        if bias is not None:
            y = y + bias.to(out_dtype)
        ctx.layer, ctx.m, ctx.has_bias = layer, m, bias is not None
        ctx.b_dtype = bias.dtype if bias is not None else None
        ctx.x_dtype, ctx.w_dtype, ctx.need_grad_weight = x.dtype, weight.dtype, need_grad_weight
        ctx.x_fmt, ctx.x_gran = x_rows.fmt, (x_cols.granularity if x_cols is not None else None)
        ctx.w_fmt, ctx.w_gran = w_cols.fmt, w_cols.granularity
        ctx.save_for_backward(*(x_cols.data, x_cols.scale_inv) if x_cols is not None else (None, None),
                              w_cols.data, w_cols.scale_inv)
        return y if x.dim() == 2 else y.reshape(*tokens, y.shape[-1])

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        layer = ctx.layer
        x_data, x_scale_inv, w_data, w_scale_inv = ctx.saved_tensors
        dy2d = grad_y if grad_y.dim() == 2 else grad_y.reshape(-1, grad_y.shape[-1])  # [M, N]
        if layer.token_multiple > 1:
            dy2d = pad_tokens(dy2d, layer.token_multiple)
        need_grad_input = ctx.needs_input_grad[0]
        dy_rows, dy_cols = layer.grad_output_caster.cast(dy2d.contiguous(), need_cols=ctx.need_grad_weight)
        grad_x = grad_w = grad_b = None
        if need_grad_input:
            w_cols = QuantizedTensor(w_data, w_scale_inv, ctx.w_gran, ctx.w_fmt)
            grad_x = layer.backend.mm(dy_rows, w_cols, ctx.x_dtype, gemm="grad_input")
            if grad_x.shape[0] != ctx.m:
                grad_x = grad_x[:ctx.m]
            if grad_y.dim() != 2:
                grad_x = grad_x.reshape(*grad_y.shape[:-1], grad_x.shape[-1])
        if ctx.need_grad_weight:
            x_cols = QuantizedTensor(x_data, x_scale_inv, ctx.x_gran, ctx.x_fmt)
            # the GEMM accumulates in FP32 and rounds once to the weight's dtype (DeepSpeed then
            # accumulates micro-batch gradients in FP32)
            grad_w = layer.backend.mm(dy_cols, x_cols, ctx.w_dtype, gemm="grad_weight")
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = dy2d[:ctx.m].float().sum(dim=0).to(ctx.b_dtype)
        return grad_x, grad_w, grad_b, None

