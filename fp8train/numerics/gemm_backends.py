"""GEMM backends behind one seam: out[M, N] = A[M, K] @ B[N, K]^T for two QuantizedTensors.

A backend is anything with a `name` and `mm(a, b, out_dtype, gemm)` (`GemmBackend`); the ones
here are registered in `GEMM_BACKENDS`. The MoE experts' grouped GEMMs go through the same seam:
`grouped_mm_experts(a, b, offs, out_dtype, gemm)` (output, grad_input: rows grouped by expert, b a
stacked [E, N, K] `ExpertOperand`) and `grouped_mm_tokens(a, b, offs, out_dtype)` (grad_weight: the
contraction grouped), one call for all experts (grouped_gemm.py holds both implementations).
Which one a layer gets, and why, is decided in ONE place, backend_policy.py (Transformer Engine,
which swaps whole modules, is chosen there too).

    emulated   any device: dequantize both operands to FP32 and matmul in FP32. It applies exactly
               the quantization error of the FP8 recipe, so CPU CI runs every recipe through it
               (grouped GEMMs included, without a host sync when traced).
    scaled_mm  Hopper/Ada tensor cores via torch._scaled_mm (tensorwise, rowwise) and
               torch.nn.functional.scaled_mm (DeepSeek-V3 blockwise: 1x128 x 128x128 for the forward
               and grad_input GEMMs, 1x128 x 1x128 for grad_weight). FP32 accumulation; the forward
               GEMM may use fast accumulation like Transformer Engine (`fast_accum_output`). Grouped
               GEMMs: fp8train's Triton kernels (kernels/grouped_gemm_ops.py), any E4M3/E5M2 pair.

cuBLAS wants B column-major: B is stored [N, K] row-major, so `B.data.t()` is the [K, N]
column-major view it needs, no copy. Blockwise scales must be "outer-dimension major": a tile
scale [M, K/128] is passed with strides (1, M); the 128x128 scale of B is passed as the transpose
of its contiguous [N/128, K/128] grid. Tensorwise and rowwise GEMMs need dimensions that are
multiples of 16: smaller or ragged shapes are zero-padded (zeros add nothing to the products).

`scaled_mm_support(gemm_class)` says whether this device runs a recipe's GEMMs on tensor cores,
with the reason.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from fp8train.numerics.grouped_gemm import (ExpertOperand, emulated_experts, emulated_tokens, kernel_experts,
                                            kernel_tokens)
from fp8train.quant.formats import E5M2
from fp8train.quant.granularity import GranularityKind
from fp8train.quant.schemes import GemmClass
from fp8train.quant.tensor import QuantizedTensor

_ALIGN = 16
_EPILOGUE_SCALED = (GranularityKind.TENSOR, GranularityKind.ROW)


class GemmBackend(Protocol):
    name: str

    def mm(self, a: QuantizedTensor, b: QuantizedTensor, out_dtype: torch.dtype, gemm: str = "") -> torch.Tensor:
        """out [M, N] = a [M, K] . b [N, K]^T with FP32 accumulation; gemm names the GEMM role."""

    def grouped_mm_experts(self, a: QuantizedTensor, b: ExpertOperand, offs: torch.Tensor, out_dtype: torch.dtype,
                           gemm: str = "") -> torch.Tensor:
        """out [T, N]: rows of expert e (ending at offs[e]) = a's rows . b[e]^T; rows past offs[-1] zeros."""

    def grouped_mm_tokens(self, a: QuantizedTensor, b: QuantizedTensor, offs: torch.Tensor,
                          out_dtype: torch.dtype, groups_aligned: bool = False) -> torch.Tensor:
        """out [E, M, N]: out[e] = a[:, tokens of e] . b[:, tokens of e]^T; zeros for an expert without tokens."""


class EmulatedBackend:
    name = "emulated"

    def mm(self, a: QuantizedTensor, b: QuantizedTensor, out_dtype: torch.dtype, gemm: str = "") -> torch.Tensor:
        return (a.dequantize() @ b.dequantize().t()).to(out_dtype)

    def grouped_mm_experts(self, a, b, offs, out_dtype, gemm=""):
        return emulated_experts(a, b, offs, out_dtype)

    def grouped_mm_tokens(self, a, b, offs, out_dtype, groups_aligned=False):
        return emulated_tokens(a, b, offs, out_dtype)


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    return t if t.shape[0] == rows else F.pad(t, (0, 0, 0, rows - t.shape[0]))


def _round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


def _outer_major(scale: torch.Tensor) -> torch.Tensor:
    """Same values, column-major storage: shape (R, C) with strides (1, R)."""
    return scale.t().contiguous().t()


class ScaledMMBackend:
    name = "scaled_mm"

    def __init__(self, fast_accum_output: bool = True):
        self.fast_accum_output = fast_accum_output

    def mm(self, a: QuantizedTensor, b: QuantizedTensor, out_dtype: torch.dtype, gemm: str = "") -> torch.Tensor:
        fast = self.fast_accum_output and gemm == "output"
        if a.kind in _EPILOGUE_SCALED:
            return self._mm_epilogue_scaled(a, b, out_dtype, fast)
        return self._mm_blockwise(a, b, out_dtype, fast)

    def grouped_mm_experts(self, a, b, offs, out_dtype, gemm=""):
        return kernel_experts(a, b, offs, out_dtype, self.fast_accum_output and gemm == "output")

    def grouped_mm_tokens(self, a, b, offs, out_dtype, groups_aligned=False):
        return kernel_tokens(a, b, offs, out_dtype, groups_aligned)

    def _mm_epilogue_scaled(self, a, b, out_dtype, fast):
        (m, k), n = a.shape, b.shape[0]
        tensorwise = a.kind is GranularityKind.TENSOR
        if tensorwise and not (m % _ALIGN or n % _ALIGN or k % _ALIGN):
            # the common case, kept free of padding checks and views: they cost host time per GEMM
            return torch._scaled_mm(a.data, b.data.t(), scale_a=a.scale_inv, scale_b=b.scale_inv,
                                    out_dtype=out_dtype, use_fast_accum=fast)
        mp, np_, kp = _round_up(m, _ALIGN), _round_up(n, _ALIGN), _round_up(k, _ALIGN)
        a_data, b_data = a.data, b.data
        if kp != k:
            a_data, b_data = F.pad(a_data.view(torch.uint8), (0, kp - k)).view(a_data.dtype), \
                F.pad(b_data.view(torch.uint8), (0, kp - k)).view(b_data.dtype)
        a_data = _pad_rows(a_data.view(torch.uint8), mp).view(a.data.dtype)
        b_data = _pad_rows(b_data.view(torch.uint8), np_).view(b.data.dtype)
        if tensorwise:
            scale_a, scale_b = a.scale_inv.reshape(()), b.scale_inv.reshape(())
        else:
            scale_a = F.pad(a.scale_inv, (0, 0, 0, mp - m), value=1.0).contiguous()
            scale_b = F.pad(b.scale_inv, (0, 0, 0, np_ - n), value=1.0).reshape(1, np_).contiguous()
        gemm_dtype = out_dtype if tensorwise else torch.bfloat16 if out_dtype != torch.float32 else torch.float32
        out = torch._scaled_mm(a_data, b_data.t(), scale_a=scale_a, scale_b=scale_b,
                               out_dtype=gemm_dtype, use_fast_accum=fast)
        return out[:m, :n].to(out_dtype)

    def _mm_blockwise(self, a, b, out_dtype, fast):
        if E5M2 in (a.fmt, b.fmt):  # cuBLAS's 1x128 / 128x128 scaling takes E4M3 only
            return _dequantized_bf16_mm(a, b, out_dtype)
        m = a.shape[0]
        if m % _ALIGN:  # e.g. one MoE expert's tokens: cuBLAS rejects ragged M (seen on the H100)
            mp = _round_up(m, _ALIGN)
            a = QuantizedTensor(_pad_rows(a.data.view(torch.uint8), mp).view(a.data.dtype),
                                F.pad(a.scale_inv, (0, 0, 0, mp - m), value=1.0), a.granularity, a.fmt)
            return self._mm_blockwise(a, b, out_dtype, fast)[:m]
        scale_a = _outer_major(a.scale_inv)  # (M, K/128), strides (1, M)
        b_block = b.kind is GranularityKind.BLOCK
        if b_block:
            # (K/128 rounded up to 4, N/128) with strides (1, K/128 rounded up): the transpose of a
            # contiguous [N/128, K/128] grid whose inner dim cuBLAS wants padded to a multiple of 4
            grid = b.scale_inv
            pad = (-grid.shape[1]) % 4
            scale_b = (F.pad(grid, (0, pad), value=1.0) if pad else grid).t()  # F.pad copies even by 0
        else:
            scale_b = _outer_major(b.scale_inv)  # (N, K/128), strides (1, N)
        # cuBLAS has no fast-accumulation mode for blockwise scaling (it promotes per 128 of K anyway)
        if torch.compiler.is_compiling():  # Dynamo cannot trace F.scaled_mm's builtin: an operator
            return torch.ops.fp8train.blockwise_mm(a.data, scale_a, b.data, scale_b, b_block, out_dtype)
        return _blockwise_mm(a.data, scale_a, b.data, scale_b, b_block, out_dtype)


def _dequantized_bf16_mm(a: QuantizedTensor, b: QuantizedTensor, out_dtype) -> torch.Tensor:
    """A blockwise GEMM with an E5M2 operand, which cuBLAS rejects ("Invalid scaling configuration",
    H200, torch 2.11): both operands dequantized to BF16, one BF16 tensor-core GEMM (FP32 accumulation).

    The quantization is the recipe's (same codes, same scales); the only extra rounding is each
    dequantized value to BF16, 2^-9 relative, 1/64 of E5M2's own worst case (2^-3 / 2). So a
    numerics study of the design card's formats with blockwise scales (recipes/v3_fp8_blockwise.yaml)
    runs on the GPU; it runs at BF16 speed, not FP8 speed."""
    return (a.dequantize().to(torch.bfloat16) @ b.dequantize().to(torch.bfloat16).t()).to(out_dtype)


def dense_fallback_note(recipe) -> str:
    """What the backend reason of a dense FP8Linear adds when scaled_mm cannot run every GEMM of
    `recipe` in FP8: blockwise scaling with an E5M2 operand (the MoE grouped GEMMs are Triton
    kernels and take any E4M3/E5M2 pair)."""
    e5m2 = [role for role in ("input", "weight", "grad_output") if recipe.role(role).format == "e5m2"]
    if recipe.gemm_class is not GemmClass.BLOCKWISE or not e5m2:
        return ""
    return (f"; its blockwise GEMMs with an E5M2 operand ({', '.join(e5m2)}) run as BF16 products of the "
            "dequantized operands (cuBLAS blockwise scaling takes E4M3 only): same numerics, BF16 speed")


def _blockwise_mm(a_data, scale_a, b_data, scale_b, b_block: bool, out_dtype):
    """A [M, K] 1x128-tiled times B [N, K] (128x128 blocks or 1x128 tiles), FP32 accumulation."""
    recipe_b = F.ScalingType.BlockWise128x128 if b_block else F.ScalingType.BlockWise1x128
    return F.scaled_mm(a_data, b_data.t(), scale_a, F.ScalingType.BlockWise1x128, scale_b, recipe_b,
                       output_dtype=out_dtype, use_fast_accum=False)


@torch.library.custom_op("fp8train::blockwise_mm", mutates_args=())
def blockwise_mm(a_data: torch.Tensor, scale_a: torch.Tensor, b_data: torch.Tensor, scale_b: torch.Tensor,
                 b_block: bool, out_dtype: torch.dtype) -> torch.Tensor:
    """_blockwise_mm as an operator, so torch.compile can put it in a graph."""
    return _blockwise_mm(a_data, scale_a, b_data, scale_b, b_block, out_dtype)


@blockwise_mm.register_fake
def _(a_data, scale_a, b_data, scale_b, b_block, out_dtype):
    return a_data.new_empty((a_data.shape[0], b_data.shape[0]), dtype=out_dtype)


def fp8_gemm_capability(device: torch.device | None = None) -> tuple[bool, str]:
    """Can this device run FP8 tensor-core GEMMs? (ok, reason)"""
    if not torch.cuda.is_available():
        return False, "no CUDA device (FP8 tensor cores need compute capability >= 8.9)"
    index = device.index if device is not None and device.index is not None else torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    name = torch.cuda.get_device_name(index)
    if (major, minor) < (8, 9):
        return False, f"{name} has compute capability {major}.{minor}; FP8 GEMMs need >= 8.9"
    return True, f"{name} (compute capability {major}.{minor})"


def scaled_mm_support(gemm_class: GemmClass) -> tuple[bool, str]:
    """Does torch's scaled_mm on this device support this recipe's GEMMs? (ok, reason)"""
    ok, why = fp8_gemm_capability()
    if not ok:
        return False, why
    major, _ = torch.cuda.get_device_capability()
    if gemm_class is not GemmClass.TENSORWISE and major < 9:
        return False, f"{gemm_class.value} scaled_mm needs Hopper (compute capability 9.x); {why}"
    if gemm_class is GemmClass.BLOCKWISE and not hasattr(F, "scaled_mm"):
        return False, f"torch {torch.__version__} has no torch.nn.functional.scaled_mm (blockwise)"
    return True, f"scaled_mm on {why}"


GEMM_BACKENDS = {"emulated": EmulatedBackend, "scaled_mm": ScaledMMBackend}
