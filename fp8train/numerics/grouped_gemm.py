"""All experts' FP8 GEMMs in one call each: the stacked weight operands, the kernels, the emulation.

The three GEMMs of a grouped (MoE) layer in the NT form (out = A B^T, both operands row-major along
the contraction; offs = int32 END row / token of every expert's group, on the device):

    output       Y  [T, N]    rows of e = X_rows[rows of e] . W_e^T          experts form, b = W    [E, N, K]
    grad_input   dX [T, K]    rows of e = dY_rows[rows of e] . (W_e^T)^T     experts form, b = W^T  [E, K, N]
    grad_weight  dW [E, N, K] dW_e = dY_cols[:, tokens of e] . X_cols[:, tokens of e]^T     tokens form

`ExpertOperand` is a stacked [E, R, C] operand. The weight rows are ONE cast of W viewed [E*N, K]
(then [E, N, K], no copy); W^T is that cast's ONE transposed copy [K, E*N] viewed [K, E, N] and
permuted to [E, K, N]: inner stride 1, expert stride N, row stride E*N, which the kernels read as is.
128x128 block scales follow the same views: [E*N/128, K/128] -> [E, N/128, K/128], and the
transposed [K/128, E*N/128] -> [K/128, E, N/128] -> [E, K/128, N/128] (N a multiple of 128, so no
block straddles two experts).

Two implementations, behind the GEMM backends (gemm_backends.py):
  * kernels (the scaled_mm backend): kernels.grouped_mm_{experts,tokens}_{tensorwise,blockwise},
    one launch per GEMM for all experts, any E4M3/E5M2 pair, offsets read on the device only; while
    torch.compile traces, their custom operators torch.ops.fp8train.* (kernels/library.py).
  * emulated (any device, CPU CI): dequantize to FP32 and multiply, which applies exactly the
    recipe's quantization error. Eager on CPU it reads the offsets on the host (free there) and
    multiplies every expert's rows as a block zero-padded to 16 rows (128 for tile and block
    scales): the shapes the previous per-expert path multiplied, so CPU BLAS sums in the same order
    and fixed-seed CPU runs stay bit-identical (tests/numerics/test_refactor_fingerprint.py).
    Traced by torch.compile, or on CUDA, it never reads them: each expert's product is taken over
    all rows and masked (E times the FLOPs: it is a CI reference, not a fast path), so a compiled
    graph has no break and no sync.
Both follow the kernels' semantics: rows past offs[-1] and experts without tokens are zeros.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fp8train.quant import casts
from fp8train.quant.formats import NumberFormat
from fp8train.quant.granularity import Granularity, GranularityKind
from fp8train.quant.schemes import BLOCK
from fp8train.quant.tensor import QuantizedTensor

EMULATION_PAD = 16  # tensorwise / rowwise per-expert blocks of the emulation (cuBLAS alignment)
_GROUPED = (GranularityKind.TILE, GranularityKind.BLOCK)


@dataclass
class ExpertOperand:
    """E stacked operands [E, R, C] (inner stride 1, any expert / row strides) and their decode factors:
    tensor scales [] or [1] (one for all experts), row scales [E, R, 1], block scales [E, R/128, C/128]."""

    data: torch.Tensor
    scale_inv: torch.Tensor
    granularity: Granularity
    fmt: NumberFormat

    @property
    def kind(self) -> GranularityKind:
        return self.granularity.kind

    @property
    def num_experts(self) -> int:
        return self.data.shape[0]

    def expert(self, e: int) -> QuantizedTensor:
        """Expert e's [R, C] operand (views)."""
        scale = self.scale_inv if self.kind is GranularityKind.TENSOR else self.scale_inv[e]
        return QuantizedTensor(self.data[e], scale, self.granularity, self.fmt)


def stack_weight(rows: QuantizedTensor, cols: QuantizedTensor | None, num_experts: int):
    """(W rows [E, N, K], W^T [E, K, N] or None) from the cast of W [E*N, K] and its transposed copy [K, E*N]."""
    n = rows.shape[0] // num_experts
    k = rows.shape[1]
    scale = rows.scale_inv
    if rows.kind is GranularityKind.BLOCK:
        scale = scale.reshape(num_experts, n // BLOCK, k // BLOCK)
    elif rows.kind is GranularityKind.ROW:
        scale = scale.reshape(num_experts, n, 1)
    w_rows = ExpertOperand(rows.data.view(num_experts, n, k), scale, rows.granularity, rows.fmt)
    return w_rows, (None if cols is None else stack_weight_cols(cols, num_experts))


def stack_weight_cols(cols: QuantizedTensor, num_experts: int) -> ExpertOperand:
    """W^T [E, K, N] from the transposed copy [K, E*N] of the cast of W [E*N, K]."""
    k, n = cols.shape[0], cols.shape[1] // num_experts
    scale_t = cols.scale_inv
    if cols.kind is GranularityKind.BLOCK:
        scale_t = scale_t.reshape(k // BLOCK, num_experts, n // BLOCK).permute(1, 0, 2)
    data_t = cols.data.reshape(k, num_experts, n).permute(1, 0, 2)
    return ExpertOperand(data_t, scale_t, cols.granularity, cols.fmt)


# ---------------------------------------------------------------- kernels (scaled_mm backend)
def _grouped_op(name: str):
    """kernels.<name>, or its custom operator while torch.compile traces."""
    if torch.compiler.is_compiling():
        return getattr(torch.ops.fp8train, name)
    casts.kernel_status()  # imports (and vets) fp8train's kernels package once
    import kernels  # noqa: PLC0415

    return getattr(kernels, name)


def _one(scale_inv: torch.Tensor) -> torch.Tensor:
    return scale_inv.reshape(1).float()


def kernel_experts(a: QuantizedTensor, b: ExpertOperand, offs: torch.Tensor, out_dtype: torch.dtype,
                   fast_accum: bool) -> torch.Tensor:
    """out [T, N]: one grouped launch (tensorwise with any FP8 pair, or DeepSeek-V3 blockwise)."""
    if a.kind is GranularityKind.TENSOR:
        return _grouped_op("grouped_mm_experts_tensorwise")(a.data, b.data, _one(a.scale_inv), _one(b.scale_inv),
                                                            offs, out_dtype, fast_accum)
    return _grouped_op("grouped_mm_experts_blockwise")(a.data, b.data, a.scale_inv, b.scale_inv, offs, out_dtype)


def kernel_tokens(a: QuantizedTensor, b: QuantizedTensor, offs: torch.Tensor, out_dtype: torch.dtype,
                  groups_aligned: bool = False) -> torch.Tensor:
    """out [E, M, N] = per expert a[:, tokens] . b[:, tokens]^T, one grouped launch."""
    if a.kind is GranularityKind.TENSOR:
        return _grouped_op("grouped_mm_tokens_tensorwise")(a.data, b.data, _one(a.scale_inv), _one(b.scale_inv),
                                                           offs, out_dtype, False, groups_aligned)
    return _grouped_op("grouped_mm_tokens_blockwise")(a.data, b.data, a.scale_inv, b.scale_inv, offs, out_dtype)


# ---------------------------------------------------------------- emulation (any device)
def _pad_of(op) -> int:
    return BLOCK if op.kind in _GROUPED else EMULATION_PAD


def _reads_offsets_on_host(offs: torch.Tensor) -> bool:
    return offs.device.type == "cpu" and not torch.compiler.is_compiling()


def _bounds(offs: torch.Tensor):
    start = 0
    for e, end in enumerate(int(v) for v in offs.tolist()):  # CPU tensor: no device to sync with
        yield e, start, end
        start = end


def _padded_rows_product(a: torch.Tensor, b: torch.Tensor, pad: int, out_dtype) -> torch.Tensor:
    """(a [m, C] zero-padded to a multiple of `pad` rows) . b [N, C]^T in FP32, rounded once, m rows."""
    m = a.shape[0]
    extra = (-m) % pad
    return (F.pad(a, (0, 0, 0, extra)) @ b.t()).to(out_dtype)[:m]


def emulated_experts(a: QuantizedTensor, b: ExpertOperand, offs: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """The experts form in FP32 (see the module docstring for the two ways it walks the groups)."""
    rows, width = a.shape[0], b.data.shape[1]
    if _reads_offsets_on_host(offs):
        out = torch.zeros(rows, width, dtype=out_dtype, device=a.data.device)
        for e, start, end in _bounds(offs):
            if end > start:
                block = a.rows(start, end - start).dequantize()
                out[start:end] = _padded_rows_product(block, b.expert(e).dequantize(), _pad_of(a), out_dtype)
        return out
    a_hp = a.dequantize()
    expert_of_row = torch.searchsorted(offs.long(), torch.arange(rows, device=offs.device), right=True)[:, None]
    out = a_hp.new_zeros(rows, width, dtype=out_dtype)
    for e in range(b.num_experts):
        out = torch.where(expert_of_row == e, (a_hp @ b.expert(e).dequantize().t()).to(out_dtype), out)
    return out


def emulated_tokens(a: QuantizedTensor, b: QuantizedTensor, offs: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """The tokens form in FP32: out[e] = a[:, tokens of e] . b[:, tokens of e]^T, zeros without tokens."""
    experts, tokens = offs.shape[0], a.shape[1]
    if _reads_offsets_on_host(offs):
        out = torch.zeros(experts, a.shape[0], b.shape[0], dtype=out_dtype, device=a.data.device)
        pad = _pad_of(a)
        for e, start, end in _bounds(offs):
            if end > start:
                extra = (-(end - start)) % pad
                a_e = F.pad(a.cols(start, end - start).dequantize(), (0, extra))
                b_e = F.pad(b.cols(start, end - start).dequantize(), (0, extra))
                out[e] = (a_e @ b_e.t()).to(out_dtype)
        return out
    a_hp, b_hp = a.dequantize(), b.dequantize()
    expert_of_token = torch.searchsorted(offs.long(), torch.arange(tokens, device=offs.device), right=True)
    return torch.stack([((a_hp * (expert_of_token == e)) @ b_hp.t()).to(out_dtype) for e in range(experts)])
