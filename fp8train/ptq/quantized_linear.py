"""QuantizedLinear: a post-training-quantized nn.Linear, with a reference forward and a kernel hook.

Stored state (buffers, the layout the core defines and the low-bit kernels read):

    weight_codes      [N, K]  codes of W (N = out features, K = in features = the contraction dim),
                              one per byte (int8/uint8, or float8_e4m3fn); `packed_codes()` gives
                              4-bit codes two to a byte (fp8train.quant.packing.pack_4bit)
    weight_scale_inv  the decode step of each group: [N, 1] per channel, [N, K/G] for 1xG tiles,
                      [N/G, K/G] for GxG blocks, [] per tensor
    weight_zero_point same shape, integer codes (asymmetric grids only):
                          W ~= (codes - zero_point) * scale_inv          (the core's convention)
    input_scale_inv   [] calibrated decode step of the input (static W8A8 only)
    outlier_index     [n] input channels kept in high precision (LLM.int8-style, optional)
    outlier_weight    [N, n] their weight columns, high precision (the codes hold zeros there)

Forward (the reference; exact emulation of what a kernel computes):

    weight-only   y = x @ dequantize(W)^T                     (FP32 math, output in x's dtype)
    W8A8 int8     xq = quantize(x) per token (dynamic) or per tensor (static);
                  y = (xq @ Wq^T) * s_x * s_w                  integer GEMM emulated exactly
                                                               (FP32 partial sums below 2^24, added in FP64)
    W8A8 fp8      same with E4M3 codes: y = (xq @ Wq^T) * s_x * s_w in FP32
    outliers      y += x[:, outlier_index] @ outlier_weight^T  (those channels are zeroed in x
                                                               before x is quantized)

The hook: `QuantizedLinear.kernel` (class-wide, or set on one instance) is `None` or a callable
`kernel(layer, x) -> Tensor | NotImplemented`; returning NotImplemented falls back to the reference.
Kernels are tested against `reference_forward`.
"""

from __future__ import annotations

from typing import Callable, ClassVar

import torch
from torch import nn

from fp8train.quant import reference
from fp8train.quant.granularity import GranularityKind
from fp8train.quant.packing import pack_4bit
from fp8train.quant.spec import QuantSpec
from fp8train.quant.tensor import QuantizedTensor

_FP32_EXACT_INTEGER = 2 ** 24


class QuantizedLinear(nn.Module):
    """y = x W^T (+ b) with W stored as codes and decode steps (see the module docstring)."""

    kernel: ClassVar[Callable | None] = None

    def __init__(self, in_features: int, out_features: int, weight_spec: QuantSpec,
                 input_spec: QuantSpec | None = None, bias: bool = False, n_outliers: int = 0,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        _check_specs(weight_spec, input_spec)
        self.in_features, self.out_features = in_features, out_features
        self.weight_spec, self.input_spec = weight_spec, input_spec
        grid, fmt = weight_spec.grid, weight_spec.fmt
        grid.check_shape(out_features, in_features, "weight [out_features, in_features]")
        scale_shape = grid.scale_shape(out_features, in_features)
        self.register_buffer("weight_codes", torch.zeros(out_features, in_features, dtype=fmt.dtype))
        self.register_buffer("weight_scale_inv", torch.ones(scale_shape))
        zero = None if fmt.is_float or weight_spec.symmetric else torch.zeros(scale_shape, dtype=fmt.dtype)
        self.register_buffer("weight_zero_point", zero)
        static = input_spec is not None and not input_spec.dynamic
        self.register_buffer("input_scale_inv", torch.ones(()) if static else None)
        self.register_buffer("outlier_index", torch.zeros(n_outliers, dtype=torch.long) if n_outliers else None)
        self.register_buffer("outlier_weight", torch.zeros(out_features, n_outliers, dtype=dtype)
                             if n_outliers else None)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype)) if bias else None
        self._dequantized: torch.Tensor | None = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_weight(cls, weight: QuantizedTensor, weight_spec: QuantSpec, input_spec: QuantSpec | None = None,
                    bias: torch.Tensor | None = None, input_scale_inv: torch.Tensor | None = None,
                    outlier_index: torch.Tensor | None = None,
                    outlier_weight: torch.Tensor | None = None) -> "QuantizedLinear":
        out_features, in_features = weight.shape
        n_out = 0 if outlier_index is None else int(outlier_index.numel())
        dtype = bias.dtype if bias is not None else (outlier_weight.dtype if n_out else torch.float32)
        layer = cls(in_features, out_features, weight_spec, input_spec, bias is not None, n_out, dtype)
        layer.weight_codes.copy_(weight.data)
        layer.weight_scale_inv.copy_(weight.scale_inv.reshape(layer.weight_scale_inv.shape))
        if layer.weight_zero_point is not None:
            layer.weight_zero_point.copy_(weight.zero_point.reshape(layer.weight_zero_point.shape))
        if layer.input_scale_inv is not None:
            if input_scale_inv is None:
                raise ValueError("a static input quantizer (dynamic: false) needs a calibrated input_scale_inv")
            layer.input_scale_inv.copy_(input_scale_inv.reshape(()))
        if n_out:
            layer.outlier_index.copy_(outlier_index)
            layer.outlier_weight.copy_(outlier_weight)
        if bias is not None:
            layer.bias.data.copy_(bias)
        return layer

    def extra_repr(self) -> str:
        acts = f", input={self.input_spec.describe()}" if self.input_spec else ""
        outl = f", outliers={self.outlier_index.numel()}" if self.outlier_index is not None else ""
        return f"{self.in_features}, {self.out_features}, weight={self.weight_spec.describe()}{acts}{outl}"

    # ------------------------------------------------------------------ views
    def weight_quantized(self) -> QuantizedTensor:
        spec = self.weight_spec
        return QuantizedTensor(self.weight_codes, self.weight_scale_inv, spec.grid, spec.fmt, self.weight_zero_point)

    def packed_codes(self) -> torch.Tensor:
        """4-bit codes two to a byte, [N, K/2] uint8 (low nibble first), for the low-bit kernels."""
        if self.weight_spec.bits != 4:
            raise ValueError(f"packed_codes needs a 4-bit weight format, this layer has {self.weight_spec.describe()}")
        return pack_4bit(self.weight_codes)

    def dequantized_weight(self) -> torch.Tensor:
        """W as FP32 [N, K] (outlier columns included), cached until the buffers are reloaded."""
        if self._dequantized is None or self._dequantized.device != self.weight_codes.device:
            weight = self.weight_quantized().dequantize()
            if self.outlier_index is not None:
                weight[:, self.outlier_index] = self.outlier_weight.float()
            self._dequantized = weight
        return self._dequantized

    def _load_from_state_dict(self, *args, **kwargs):
        self._dequantized = None
        return super()._load_from_state_dict(*args, **kwargs)

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = self.kernel
        if kernel is not None:
            y = kernel(self, x)
            if y is not NotImplemented:
                return y
        return reference_forward(self, x)


_PER_TOKEN_OR_TENSOR = (GranularityKind.ROW, GranularityKind.TENSOR)  # W8A8: one scale per row or tensor


def _check_specs(weight_spec: QuantSpec, input_spec: QuantSpec | None) -> None:
    """Which weight/input pairs one GEMM can take (ValueError naming the pair otherwise)."""
    if input_spec is None:
        return
    pair = f"weight {weight_spec.describe()} with input {input_spec.describe()}"
    if not input_spec.symmetric:
        raise ValueError(f"{pair}: activation quantization must be symmetric (int8 or e4m3)")
    if input_spec.kind is GranularityKind.TILE:
        if weight_spec.kind is not GranularityKind.BLOCK or not (weight_spec.fmt.is_float and input_spec.fmt.is_float):
            raise ValueError(f"{pair}: 1xG activation tiles pair only with GxG FP8 weight blocks (DeepSeek-V3)")
        return
    if input_spec.kind not in _PER_TOKEN_OR_TENSOR:
        raise ValueError(f"{pair}: activations are quantized per token (row), per tensor, or in 1x128 tiles")
    if weight_spec.kind not in _PER_TOKEN_OR_TENSOR or not weight_spec.symmetric:
        raise ValueError(f"{pair}: W8A8 needs symmetric per-channel or per-tensor weights (the GEMM "
                         f"epilogue applies one weight scale per output channel)")


def quantize_input(layer: QuantizedLinear, x2d: torch.Tensor) -> QuantizedTensor:
    """The input operand of a W8A8 GEMM: per-token (dynamic) or per-tensor (static) codes."""
    spec = layer.input_spec
    if layer.input_scale_inv is None:
        return reference.quantize(x2d, spec.fmt, spec.grid, symmetric=True)
    step = layer.input_scale_inv
    if spec.fmt.is_float:
        return reference.quantize_with_scale(x2d, spec.fmt, torch.div(torch.ones_like(step), step), spec.grid)
    return reference.quantize_with_step(x2d, spec.fmt, step, None, spec.grid)


def _row_scales(q: QuantizedTensor, rows: int) -> torch.Tensor:
    return q.scale_inv.reshape(-1, 1).expand(rows, 1) if q.kind is GranularityKind.TENSOR else q.scale_inv.reshape(rows, 1)


def _exact_integer_matmul(a: torch.Tensor, b: torch.Tensor, bound_per_k: float) -> torch.Tensor:
    """a [M, K] @ b [N, K]^T of integer codes, exactly: FP32 GEMMs over K chunks small enough that
    no partial sum passes 2^24 (where FP32 stops holding every integer), chunks added in FP64."""
    k = a.shape[1]
    chunk = max(1, int(_FP32_EXACT_INTEGER // bound_per_k))
    if chunk >= k:
        return a.float() @ b.float().t()
    total = None
    for start in range(0, k, chunk):
        part = (a[:, start:start + chunk].float() @ b[:, start:start + chunk].float().t()).double()
        total = part if total is None else total + part
    return total


def quantized_matmul(xq: QuantizedTensor, wq: QuantizedTensor) -> torch.Tensor:
    """(codes_x @ codes_w^T) * s_x * s_w in FP32: the GEMM with a per-row x per-column epilogue.

    Integer codes are accumulated exactly, like an INT8 tensor-core GEMM's INT32 accumulator;
    FP8 products are exact in FP32 and accumulate in FP32."""
    m = xq.shape[0]
    n = wq.shape[0]
    if xq.kind is GranularityKind.TILE:  # DeepSeek-V3 blockwise: per-tile scales, dequantize first
        return xq.dequantize() @ wq.dequantize().t()
    if xq.fmt.is_float:
        acc = xq.data.float() @ wq.data.float().t()
    else:
        acc = _exact_integer_matmul(xq.data, wq.data, max(abs(xq.fmt.min), xq.fmt.max) * max(abs(wq.fmt.min), wq.fmt.max))
    return acc.float() * _row_scales(xq, m) * _row_scales(wq, n).reshape(1, n)


def reference_forward(layer: QuantizedLinear, x: torch.Tensor) -> torch.Tensor:
    """The reference semantics every kernel must reproduce (see the module docstring)."""
    x2d = x.reshape(-1, x.shape[-1])
    if layer.input_spec is None:
        y = x2d.float() @ layer.dequantized_weight().t()
    else:
        x_main = x2d.float()
        if layer.outlier_index is not None:
            x_main = x_main.index_fill(1, layer.outlier_index, 0.0)
        y = quantized_matmul(quantize_input(layer, x_main), layer.weight_quantized())
        if layer.outlier_index is not None:
            y = y + x2d.float()[:, layer.outlier_index] @ layer.outlier_weight.float().t()
    if layer.bias is not None:
        y = y + layer.bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], layer.out_features)
