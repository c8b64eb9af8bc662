"""The FP8 linear layer's autograd function: all three GEMMs in FP8 with FP32 accumulation.

For Y = X W^T + b with X [M, K] (M tokens), W [N, K]:

    output       Y  [M, N] = X_rows  [M, K] . W_rows  [N, K]^T      contracts K
    grad_input   dX [M, K] = dY_rows [M, N] . W_cols  [K, N]^T      contracts N
    grad_weight  dW [N, K] = dY_cols [N, M] . X_cols  [K, M]^T      contracts M (tokens)

`_rows` is an operand quantized along its stored last dimension, `_cols` its quantized transpose
(see role_caster.py). Each GEMM accumulates in FP32 and writes the output dtype (the input's dtype, or
as the recipe says); dW is produced in the weight's dtype for DeepSpeed's FP32 accumulation.

Saved for backward, in eager mode: X_cols (FP8 data + FP32 scales), never the high-precision X; and
W_cols, which the layer's weight cache holds for the whole step anyway. Under torch.compile (no
cache) the weight itself is saved, as BF16's linear saves it (no extra memory), and backward
re-derives W_cols from it with the same scale, bit for bit: an FP8 weight copy per layer is no
longer alive from the forward to the backward (1 byte per parameter at the peak). Delayed input
casts get the same treatment under compile (`recasts_input_cols`): X is handed to the partitioner,
which keeps or recomputes what the BF16 graph keeps, and backward re-derives X_cols.

Layers reading the same input (q/k/v, gate/up) may receive that input already cast
(`shared_input`: the leader layer that cast it, rows data and scales, cols data and scales, from
FP8Linear.shared_input): then
they save the SAME X_cols tensor, one copy for the group instead of one per layer.
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


def tokens_2d(layer, x: torch.Tensor) -> torch.Tensor:
    """x [..., K] as the token-padded [M, K] view `layer` casts."""
    x2d = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    return pad_tokens(x2d, layer.token_multiple) if layer.token_multiple > 1 else x2d


def cast_input(layer, x: torch.Tensor, need_cols: bool):
    """x [..., K] -> (x_rows, x_cols or None) of the token-padded [M, K] view, as `layer` casts it."""
    return layer.input_caster.cast(tokens_2d(layer, x), need_cols=need_cols)


def recasts_input_cols(layer) -> bool:
    """True when a compiled backward re-derives X_cols from X instead of saving it (delayed casts).

    A delayed cast records its amax (a buffer mutation), and the min-cut partitioner never
    recomputes a forward cast that mutates state, so it used to save X_cols: one FP8 byte per input
    element per layer, while X itself (the attention output, the SwiGLU product, a norm output) is
    saved or cheaply recomputable anyway. Current casts mutate nothing and were already
    recomputed. Measured on a compiled `small` block: hybrid saved 7960 bytes per token, current
    6680 (tests/numerics/test_saved_memory.py)."""
    return torch.compiler.is_compiling() and layer.input_caster.delayed


def recast_input_cols(layer, x: torch.Tensor) -> QuantizedTensor:
    """X_cols [K, M] re-derived in a compiled backward, bit for bit the forward's: the rows cast of
    X^T with the caster's delayed scale (unchanged until the optimizer step) and no amax record.
    For a shared-input group (q/k/v, gate/up) `layer` is the group's leader, whose caster cast X in
    forward: every member then recasts the same way, and the graph's CSE keeps one recast."""
    return layer.input_caster.recast(tokens_2d(layer, x.detach()).t().contiguous(), need_cols=False)[0]


def recast_weight_cols(layer, weight: torch.Tensor) -> QuantizedTensor:
    """W_cols [K, N] re-derived in a compiled backward, equal bit for bit to the forward's cast's.

    It is the rows operand of W^T cast with the same scale and no amax record: the same codes for
    the transposable granularities (tensor, 128x128 blocks: a transpose commutes with the cast),
    and the definition of cols for the others. Casting W^T (not W, then transposing) keeps these
    ops distinct from the forward's cast, so the graph cannot merge the two and save the FP8
    copy across the step: the min-cut keeps W (a parameter, alive anyway) and recasts here."""
    return layer.weight_caster.recast(weight.detach().t().contiguous(), need_cols=False)[0]


def _given_input(layer, rows_data, rows_scale, cols_data, cols_scale):
    """The shared cast's operands (cols_scale None: the rows' scale, as tensorwise casts share it)."""
    caster = layer.input_caster
    gran, fmt = caster.scheme.granularity, caster.fmt
    rows = QuantizedTensor(rows_data, rows_scale, gran, fmt)
    if cols_data is None:
        return rows, None
    return rows, QuantizedTensor(cols_data, rows_scale if cols_scale is None else cols_scale, gran, fmt)


class FP8LinearFunction(torch.autograd.Function):
    """Y = X W^T + b with FP8 GEMMs; `layer` is the FP8Linear supplying casters, cache and backend.

    `shared_input`: optionally X already cast for this layer (the leader layer that cast it, rows
    data, rows scale_inv, cols data or None, cols scale_inv or None), see the module docstring."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, layer, *shared_input):
        tokens = x.shape[:-1]
        m = x.numel() // x.shape[-1]
        need_grad_weight = ctx.needs_input_grad[1]  # False under no_grad or for a frozen weight
        ctx.recast_input = need_grad_weight and recasts_input_cols(layer)
        ctx.input_leader = shared_input[0] if shared_input else layer  # whose caster cast X
        if shared_input:
            x_rows, x_cols = _given_input(layer, *shared_input[1:])
        else:
            x_rows, x_cols = cast_input(layer, x, need_cols=need_grad_weight and not ctx.recast_input)
        ctx.recast_weight = torch.compiler.is_compiling()  # no weight cache in a graph: save W itself
        w_rows, w_cols = layer.fp8_weight(need_cols=not ctx.recast_weight)
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
        ctx.w_fmt, ctx.w_gran = w_rows.fmt, w_rows.granularity
        saved_w = (weight, None) if ctx.recast_weight else (w_cols.data, w_cols.scale_inv)
        if ctx.recast_input:
            saved_x = (x, None)
        else:
            saved_x = (x_cols.data, x_cols.scale_inv) if x_cols is not None else (None, None)
        ctx.save_for_backward(*saved_x, *saved_w)
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
            if ctx.recast_weight:
                w_cols = recast_weight_cols(layer, w_data)
            else:
                w_cols = QuantizedTensor(w_data, w_scale_inv, ctx.w_gran, ctx.w_fmt)
            grad_x = layer.backend.mm(dy_rows, w_cols, ctx.x_dtype, gemm="grad_input")
            if grad_x.shape[0] != ctx.m:
                grad_x = grad_x[:ctx.m]
            if grad_y.dim() != 2:
                grad_x = grad_x.reshape(*grad_y.shape[:-1], grad_x.shape[-1])
        if ctx.need_grad_weight:
            if ctx.recast_input:
                x_cols = recast_input_cols(ctx.input_leader, x_data)
            else:
                x_cols = QuantizedTensor(x_data, x_scale_inv, ctx.x_gran, ctx.x_fmt)
            # the GEMM accumulates in FP32 and rounds once to the weight's dtype (DeepSpeed then
            # accumulates micro-batch gradients in FP32)
            grad_w = layer.backend.mm(dy_cols, x_cols, ctx.w_dtype, gemm="grad_weight")
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = dy2d[:ctx.m].float().sum(dim=0).to(ctx.b_dtype)
        return grad_x, grad_w, grad_b, None, *([None] * (len(ctx.needs_input_grad) - 4))
