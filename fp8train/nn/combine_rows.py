"""The MoE block's row movements as gathers, with their autograd functions (kernels/moe_combine.py).

    out = combine_rows(y_sorted, topk_weight, pos)          # [N, D]: the combine
    out = sum_rows(rows, token_index, N)                     # [N, D]: the combine, weights applied before
    rows = gather_rows_by_token(x, token_index)              # [T, D]: x[token_index], the dispatch
    grad_x = sum_rows_by_token(grad_rows, token_index, N)    # that dispatch gather's backward

combine: `pos[n * k + j]` is the row of y_sorted that holds token n's j-th choice (-1: dropped); see
`fp8train.models.dispatch.assignment_rows`. Its forward is one launch (each token reads its k rows,
sums them in FP32); its backward is one launch that writes the expert rows' gradient and the routing
weights' gradient from a single read of grad_out and y.

dispatch: the forward is a plain row gather; the backward sums each token's rows (k of them, fewer
when a capacity dropped some) in FP32 with one gather launch, where autograd's own backward of
x[token_index] is an accumulating scatter into [N, D].

The kernels run where fp8train's kernels are loaded and the tensors live on a GPU
(`kernels_on`); elsewhere the same results come from torch ops. Eager calls go to `kernels.ops`;
under torch.compile to the same functions registered as `torch.ops.fp8train.*` (kernels/library.py,
registered when the kernels load), so the MoE block still compiles as one graph.
"""

from __future__ import annotations

import torch

from fp8train.quant import casts


def kernels_on(t: torch.Tensor) -> bool:
    """True when the gather kernels run for tensor t (a CUDA tensor and the kernels loaded)."""
    return t.is_cuda and casts.kernels_module() is not None


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
    """The kernel path only: callers check `kernels_on` (fp8train.models.dispatch.combine)."""
    return CombineRows.apply(y_sorted, weight.contiguous(), pos)


def sum_rows_by_token(grad_rows: torch.Tensor, token_index: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """[num_tokens, D]: the rows of each token summed in FP32 (FP64 stays FP64), grad_rows' dtype; the
    backward of x[token_index]. The gather kernel where `kernels_on`, else an accumulating index_put
    without a range check (a range check reads the indices on the host, a sync; the forward's gather
    already checked them)."""
    if kernels_on(grad_rows):
        return _op("sum_rows_by_token")(grad_rows.contiguous(), token_index, num_tokens)
    acc = torch.promote_types(grad_rows.dtype, torch.float32)
    out = grad_rows.new_zeros(num_tokens, grad_rows.shape[1], dtype=acc)
    torch.ops.aten._index_put_impl_(out, (token_index,), grad_rows.to(acc), True, True)
    return out.to(grad_rows.dtype)


class GatherRowsByToken(torch.autograd.Function):
    """x [N, D], token_index [T] -> x[token_index] [T, D]; backward = sum_rows_by_token."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, token_index: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(token_index)
        ctx.num_tokens = x.shape[0]
        return x.index_select(0, token_index)

    @staticmethod
    def backward(ctx, grad_rows: torch.Tensor):
        (token_index,) = ctx.saved_tensors
        return sum_rows_by_token(grad_rows, token_index, ctx.num_tokens), None


def gather_rows_by_token(x: torch.Tensor, token_index: torch.Tensor) -> torch.Tensor:
    """x[token_index] whose backward is one gather launch where `kernels_on` (plain indexing elsewhere)."""
    if not kernels_on(x):
        return x[token_index]
    return GatherRowsByToken.apply(x, token_index)


class SumRows(torch.autograd.Function):
    """rows [T, D], token_index [T] -> [N, D], each token's rows summed in FP32; backward: a row gather.

    The transpose of GatherRowsByToken: an unweighted combine, for experts that already multiplied
    their rows by the routing weights (MoEConfig.route_weight_before_down)."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, token_index: torch.Tensor, num_tokens: int) -> torch.Tensor:
        ctx.save_for_backward(token_index)
        return sum_rows_by_token(rows, token_index, num_tokens)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (token_index,) = ctx.saved_tensors
        return grad_out.index_select(0, token_index), None, None


def sum_rows(rows: torch.Tensor, token_index: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """out[n] = sum of rows[i] with token_index[i] == n (FP32 sum, rows' dtype); differentiable."""
    return SumRows.apply(rows, token_index, num_tokens)
