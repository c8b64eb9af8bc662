"""The MoE combine's autograd function: the gather form of kernels/moe_combine.py.

    out = combine_rows(y_sorted, topk_weight, pos)    # [N, D]

`pos[n * k + j]` is the row of y_sorted that holds token n's j-th choice (-1: dropped); see
`fp8train.models.dispatch.assignment_rows`. The forward is one launch (each token reads its k rows,
sums them in FP32); the backward is one launch that writes the expert rows' gradient and the routing
weights' gradient from a single read of grad_out and y. Eager calls go to `kernels.ops`; under
torch.compile to the same functions registered as `torch.ops.fp8train.*` (kernels/library.py), so
the MoE block still compiles as one graph.
"""

from __future__ import annotations

import torch


def _op(name: str):
    if torch.compiler.is_compiling():
        return getattr(torch.ops.fp8train, name)
    from kernels import ops  # noqa: PLC0415 (kernels import Triton lazily)

    return getattr(ops, name)


class CombineRows(torch.autograd.Function):
    """y_sorted [M, D], weight [N, k], pos [N * k] int64 -> out [N, D] in y_sorted's dtype."""

    @staticmethod
    def forward(ctx, y_sorted: torch.Tensor, weight: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(y_sorted, weight, pos)
        return _op("combine_rows")(y_sorted, weight, pos)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        y_sorted, weight, pos = ctx.saved_tensors
        grad_y, grad_w = _op("combine_rows_backward")(grad_out.contiguous(), y_sorted, weight, pos)
        return grad_y, grad_w.view(weight.shape).to(weight.dtype), None


def combine_rows(y_sorted: torch.Tensor, weight: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """The caller has loaded the kernels (fp8train.quant.casts.kernels_module(), which also registers
    the operators)."""
    return CombineRows.apply(y_sorted, weight.contiguous(), pos)
