"""Cast once: MoE tokens are quantized BEFORE the dispatch permutation, and FP8 rows travel.

Dispatch sends token n to its k experts: x_sorted = x[token_index] has T = k N rows. The gate and
up projections both read x_sorted. Casting it in each projection (the plain path) reads k N rows
twice; here the first FP8 projection's caster quantizes the N unsorted tokens once and the FP8
rows (with their scales) are gathered instead of the high-precision ones:

    tensorwise  one scale for the whole tensor, so permuting FP8 rows is exact: gather(cast(x)) ==
                cast(gather(x)) bit for bit (the amax is that of x_sorted too: drop-free routing
                sends every token somewhere). The transposed copy X_sorted^T [K, T16] that
                grad_weight needs comes out of the same gather (kernels.gather_rows: one read of
                the FP8 rows, both layouts written).
    blockwise   1x128 row tiles travel with their rows (rows and their [N, K/128] scales gathered).
                The 128x1 token tiles of X^T group tokens of ONE expert, which exist only after
                dispatch: they are cast from the high-precision sorted tokens in the padded layout.

`SortedFP8Tokens` carries these operands to every projection that reads the sorted tokens.
Autograd still needs a [T, K] input to sum the projections' input gradients into: `carrier` is a
zero-stride stand-in for x[token_index] (no memory), whose backward is the backward of that gather
(fp8train.nn.combine_rows.sum_rows_by_token, as on the plain path). A consumer that cannot use the FP8 operands (another format or scaling, a
frozen layer, TE) gets the real rows from `materialize()`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fp8train.nn.combine_rows import sum_rows_by_token
from fp8train.numerics.grouped_layout import PaddedGroups, token_pad
from fp8train.quant import casts
from fp8train.quant.tensor import QuantizedTensor


class GatherCarrier(torch.autograd.Function):
    """[T, K] zero-stride tensor standing for x[token_index]; backward = that gather's backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, token_index: torch.Tensor):
        ctx.save_for_backward(token_index)
        ctx.x_shape = x.shape
        return x.new_zeros(1, 1).expand(token_index.shape[0], x.shape[1])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (token_index,) = ctx.saved_tensors
        return sum_rows_by_token(grad, token_index, ctx.x_shape[0]), None


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8)


def _permute_codes(data: torch.Tensor, index: torch.Tensor | None, cols: int, col_rows: torch.Tensor | None):
    """kernels.gather_rows (one Triton launch on CUDA, its operator while compiling); the same bytes
    from torch ops elsewhere. See kernels/permute.py for the arguments."""
    if data.is_cuda:
        ops = casts.kernels_module()
        if ops is not None:
            if torch.compiler.is_compiling():
                return torch.ops.fp8train.gather_rows(data, index, cols, col_rows)
            return ops.gather_rows(data, index, cols, col_rows)
    rows = _as_bytes(data) if index is None else _as_bytes(data).index_select(0, index)
    if not cols:
        return rows.view(data.dtype), None
    if col_rows is None:  # ragged: zero tokens at the end
        source = torch.cat([rows, rows.new_zeros(cols - rows.shape[0], rows.shape[1])])
    else:  # padded: every column reads its row, padding columns an appended zero row
        source = torch.cat([rows, rows.new_zeros(1, rows.shape[1])])
        source = source.index_select(0, torch.where(col_rows < 0, rows.shape[0], col_rows))
    return rows.view(data.dtype), source.t().contiguous().view(data.dtype)


def gather_rows(data: torch.Tensor, token_index: torch.Tensor, with_transpose: bool,
                groups: PaddedGroups | None = None):
    """FP8 rows data[token_index] [T, K] and, if asked, their token-major copy: ragged [K, token_pad(T)]
    (zeros past T), or in the padded layout `groups` [K, groups.rows] (zeros between the groups)."""
    if not with_transpose:
        return _permute_codes(data, token_index, 0, None)[0], None
    if groups is None:
        return _permute_codes(data, token_index, token_pad(token_index.shape[0]), None)
    return _permute_codes(data, token_index, groups.rows, groups.row_of)


def token_major(rows: torch.Tensor, groups: PaddedGroups) -> torch.Tensor:
    """The token-major copy [K, groups.rows] of FP8 rows [T, K] already in dispatch order, in the padded
    layout: a byte permutation, exact for tensorwise codes (one scale for every row)."""
    return _permute_codes(rows, None, groups.rows, groups.row_of)[1]


@dataclass
class SortedFP8Tokens:
    """The dispatched tokens as FP8 operands, shared by every projection that reads them."""

    carrier: torch.Tensor             # [T, K] autograd stand-in for x[token_index] (see above)
    rows: QuantizedTensor             # [T, K] rows in dispatch order
    cols: QuantizedTensor | None      # X_sorted^T for grad_weight (None: no weight gradient)
    caster: torch.nn.Module           # the RoleCaster that cast them (and recorded the amax)
    x: torch.Tensor                   # the unsorted tokens [N, K] (high precision)
    token_index: torch.Tensor         # [T] source token of every sorted row
    cols_align: int | None = None     # `cols` in the padded layout of this alignment (None: ragged)

    def materialize(self) -> torch.Tensor:
        """The high-precision sorted rows x[token_index], for a consumer that casts on its own."""
        return self.x[self.token_index]


def quantize_then_gather(caster, x: torch.Tensor, token_index: torch.Tensor, need_cols: bool,
                         token_tiles, groups: PaddedGroups | None = None) -> SortedFP8Tokens:
    """Cast x [N, K] once with `caster`, gather the FP8 rows; `token_tiles(x)` makes the token-major
    operand where it cannot be gathered (tile scales: cast after dispatch, from the unsorted x);
    a gathered token-major copy takes the padded layout `groups` (None: ragged).
    Gradients flow through `carrier` only: the casts are not differentiable."""
    with torch.no_grad():
        rows, cols = _fp8_operands(caster, x.detach(), token_index, need_cols, token_tiles, groups)
    return SortedFP8Tokens(GatherCarrier.apply(x, token_index), rows, cols, caster, x, token_index,
                           None if groups is None else groups.align)


def _fp8_operands(caster, x, token_index, need_cols, token_tiles, groups):
    rows_flat, _ = caster.cast(x, need_cols=False)
    transposable = rows_flat.granularity.transposable
    data, data_t = gather_rows(rows_flat.data, token_index, need_cols and transposable, groups)
    scale = rows_flat.scale_inv
    if scale.dim() == 2:  # tile / row scales travel with their rows
        scale = scale.index_select(0, token_index)
    rows = QuantizedTensor(data, scale, rows_flat.granularity, rows_flat.fmt)
    if not need_cols:
        return rows, None
    if transposable:
        return rows, QuantizedTensor(data_t, scale, rows.granularity, rows.fmt)
    return rows, token_tiles(x)
