"""lowbit_linear: y = x @ W^T for a quantized weight, on the fused Triton kernels or the core's reference.

    w = quantize(weight, UINT4, Granularity.tile(128), symmetric=False)   # fp8train.quant
    y = lowbit_linear(x, w)                                               # W4A16 g128
    y = lowbit_linear(x, quantize(weight, INT8, Granularity.row()))       # W8A16
    y = lowbit_linear(x, w8, input_spec=QuantSpec("int8", "row"))         # W8A8 INT8, per-token dynamic
    y = lowbit_linear(x, quantize(weight, E4M3, Granularity.row()), input_spec=QuantSpec("e4m3", "row"))

| weight                          | input         | CUDA (Triton / cuBLAS)                                   |
|---------------------------------|---------------|----------------------------------------------------------|
| int4 / uint4, tile G            | bf16 / fp32   | lowbit_matmul_kernel (M small..mid) or dequantize+cuBLAS  |
| int8 / uint8, row or tile G     | bf16 / fp32   | same kernels, 8-bit codes                                 |
| int8, row                       | int8 row      | quantize_rows (Triton) + int8_matmul_kernel (IMMA, fused scaling) |
| e4m3, row                       | e4m3 row      | quantize_rows (Triton) + torch._scaled_mm (row-wise scales) |

Elsewhere (CPU) the reference: dequantize with the core (QuantizedTensor.dequantize; activations
with reference.quantize) and an FP32 matmul. `LowBitWeight` is the kernel-ready form (4-bit codes
packed, FP32 scales); `prepare_weight` builds it once, so pass it instead of the QuantizedTensor on
hot paths. `swiglu=True` takes x = [gate | up] ([..., 2K]) and multiplies silu(gate) * up (fused
into the kernel's input load on CUDA).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fp8train.quant import reference
from fp8train.quant.formats import E4M3, INT8, NumberFormat
from fp8train.quant.granularity import Granularity, GranularityKind
from fp8train.quant.packing import pack_4bit, unpack_4bit
from fp8train.quant.spec import QuantSpec
from fp8train.quant.tensor import QuantizedTensor

BACKENDS = ("auto", "triton", "reference")


@dataclass
class LowBitWeight:
    """A quantized weight [N, K] in the kernels' layout (codes packed two a byte for 4 bits)."""

    codes: torch.Tensor  # [N, K] (8-bit) or [N, K/2] uint8 (4-bit)
    scale: torch.Tensor  # FP32 [N, K/G] or [N, 1]
    zero: torch.Tensor | None  # uint8, same shape (asymmetric grids)
    fmt: NumberFormat
    granularity: Granularity
    n: int
    k: int

    @property
    def bits(self) -> int:
        return self.fmt.bits

    @property
    def group(self) -> int:
        """Columns per scale (K for ROW scales)."""
        return self.granularity.size if self.granularity.kind is GranularityKind.TILE else self.k

    @property
    def kind(self) -> str:
        return f"w{self.bits}a16"

    @property
    def qt(self) -> QuantizedTensor:
        """The core's view (codes unpacked): what the reference path dequantizes."""
        data = unpack_4bit(self.codes, self.fmt) if self.bits == 4 else self.codes
        shape = self.granularity.scale_shape(self.n, self.k)
        return QuantizedTensor(data, self.scale.reshape(shape), self.granularity, self.fmt,
                               None if self.zero is None else self.zero.reshape(shape).to(self.fmt.dtype))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale, self.zero) if t is not None)


def prepare_weight(weight: QuantizedTensor | LowBitWeight) -> LowBitWeight:
    """Validate and pack once. Accepts 4-bit codes unpacked [N, K] or already packed [N, K/2]."""
    if isinstance(weight, LowBitWeight):
        return weight
    qt, fmt, grid = weight, weight.fmt, weight.granularity
    if grid.kind not in (GranularityKind.ROW, GranularityKind.TILE):
        raise ValueError(f"low-bit linears take ROW or TILE weight scales, got {grid!r}")
    if fmt.bits not in (4, 8):
        raise ValueError(f"unsupported weight format {fmt!r}")
    n = qt.data.shape[0]
    k = qt.scale_inv.shape[1] * grid.size if grid.kind is GranularityKind.TILE else qt.data.shape[1]
    codes = qt.data
    if fmt.bits == 4 and not (codes.shape[1] * 2 == k and codes.dtype == torch.uint8):
        codes = pack_4bit(codes)
    zero = None if qt.zero_point is None else qt.zero_point.to(torch.uint8).reshape(n, -1).contiguous()
    return LowBitWeight(codes.contiguous(), qt.scale_inv.float().reshape(n, -1).contiguous(), zero, fmt, grid, n, k)


def quantize_weights(weights: list[torch.Tensor], spec: QuantSpec, backend: str = "auto") -> list[LowBitWeight]:
    """Round-to-nearest quantization of many weights [N, K]: ONE launch of the batched kernel on
    CUDA (integer formats), the core's `quantize` per tensor elsewhere (bit-identical codes)."""
    fmt, grid = spec.fmt, spec.grid
    batched = (not fmt.is_float and grid.kind in (GranularityKind.ROW, GranularityKind.TILE)
               and weights and uses_triton(weights[0], backend))
    if not batched:
        return [prepare_weight(spec.quantize(w)) for w in weights]
    from kernels import lowbit_ops

    group = grid.size if grid.kind is GranularityKind.TILE else 0
    outs = lowbit_ops.batched_quantize([w.contiguous() for w in weights], fmt.bits, spec.symmetric, group)
    return [LowBitWeight(c.view(fmt.dtype) if fmt.bits == 8 else c, s, z, fmt, grid, w.shape[0], w.shape[1])
            for w, (c, s, z) in zip(weights, outs)]


def uses_triton(x: torch.Tensor, backend: str) -> bool:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}; choose one of {list(BACKENDS)}")
    if backend == "reference":
        return False
    from kernels._backend import kernel_backend

    name, reason = kernel_backend(x)
    if backend == "triton":
        if name == "reference":
            raise ValueError(f"backend='triton' but the kernels cannot run: {reason}")
        return True
    return x.is_cuda and name != "reference"


def swiglu_input(x: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up from x = [gate | up] (FP32 math, x's dtype): the reference of the fused load."""
    gate, up = x.float().chunk(2, dim=-1)
    return (F.silu(gate) * up).to(x.dtype)


def lowbit_linear(x: torch.Tensor, weight: QuantizedTensor | LowBitWeight, input_spec: QuantSpec | None = None,
                  *, swiglu: bool = False, backend: str = "auto") -> torch.Tensor:
    """x [..., K] (or [..., 2K] with swiglu) -> [..., N] in x's dtype."""
    w = prepare_weight(weight)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    k_in = x2.shape[1] // 2 if swiglu else x2.shape[1]
    if k_in != w.k:
        raise ValueError(f"input has {k_in} features but the weight expects K={w.k}")
    triton = uses_triton(x2, backend)
    if input_spec is None and w.fmt.is_float:
        raise ValueError(f"a {w.fmt!r} weight needs input_spec=QuantSpec('e4m3', 'row') (FP8 W8A8); "
                         f"weight-only kernels take integer formats (int4, uint4, int8, uint8)")
    if input_spec is None:
        out = _weight_only(x2, w, swiglu) if triton else _weight_only_reference(x2, w, swiglu)
    else:
        x2 = swiglu_input(x2) if swiglu else x2
        out = _w8a8(x2, w, input_spec, triton)
    return out.reshape(*lead, w.n)


def _weight_only(x: torch.Tensor, w: LowBitWeight, swiglu: bool) -> torch.Tensor:
    from kernels import lowbit_ops

    if lowbit_ops.weight_only_strategy(w.kind, x.shape[0], w.n, w.k) == "dequant":
        x = swiglu_input(x) if swiglu else x
        weight = lowbit_ops.dequantize_weight(w.codes, w.scale, w.zero, w.bits, w.group, w.k, x.dtype)
        return F.linear(x, weight)
    return lowbit_ops.lowbit_matmul(x, w.codes, w.scale, w.zero, w.bits, w.group, w.k, swiglu=swiglu, kind=w.kind)


def _weight_only_reference(x: torch.Tensor, w: LowBitWeight, swiglu: bool) -> torch.Tensor:
    x = swiglu_input(x) if swiglu else x
    return (x.float() @ w.qt.dequantize().t()).to(x.dtype)


def _w8a8(x: torch.Tensor, w: LowBitWeight, spec: QuantSpec, triton: bool) -> torch.Tensor:
    fmt = spec.fmt
    if spec.kind is not GranularityKind.ROW or not spec.dynamic or fmt not in (INT8, E4M3) or not spec.symmetric:
        raise ValueError(f"input_spec {spec.describe()} is not supported: W8A8 takes per-token dynamic "
                         f"int8 (symmetric) or e4m3 activations (granularity: row)")
    if w.fmt is not fmt or w.group != w.k or w.zero is not None:
        raise ValueError(f"W8A8 with {fmt!r} activations needs a {fmt!r} weight with symmetric ROW scales, "
                         f"got {w.fmt!r} {w.granularity!r}")
    if not triton:
        xq = reference.quantize(x, fmt, Granularity.row())
        if fmt is INT8:  # integer products are exact in FP64 for these sizes
            acc = xq.data.double() @ w.qt.data.double().t()
            return (acc * xq.scale_inv.double() * w.scale.double().t()).to(x.dtype)
        return (xq.dequantize() @ w.qt.dequantize().t()).to(x.dtype)
    from kernels import lowbit_ops

    xq, sx = lowbit_ops.quantize_rows(x, fp8=fmt is E4M3)
    if fmt is INT8:
        key = lowbit_ops.shape_key("w8a8_int8", x.shape[0], w.n, w.k)
        if lowbit_ops.STRATEGY.get(key) == "int_mm" and x.shape[0] > 16:  # cuBLASLt IMMA, scaling apart
            return (torch._int_mm(xq, w.codes.t()).float() * sx * w.scale.reshape(1, -1)).to(x.dtype)
        return lowbit_ops.int8_matmul(xq, sx, w.codes, w.scale, x.dtype)
    return torch._scaled_mm(xq, w.codes.t(), scale_a=sx, scale_b=w.scale.reshape(1, -1), out_dtype=x.dtype)


def module_weight(module) -> torch.Tensor | QuantizedTensor | LowBitWeight:
    """The weight a linear module multiplies by, read by duck typing: a quantized linear exposes
    `weight_quantized()` (fp8train.ptq's QuantizedLinear) or `.qweight`; a dense one a 2-D `.weight`."""
    if hasattr(module, "weight_quantized"):
        return module.weight_quantized()
    if hasattr(module, "qweight"):
        return module.qweight
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2:
        return weight
    raise ValueError(f"{type(module).__name__} has neither a 2-D .weight nor weight_quantized() / .qweight")


def _cached_lowbit(layer) -> LowBitWeight | None:
    """The layer's weight in the kernels' layout, packed once and refreshed when its codes change."""
    qt = layer.weight_quantized()
    key = (qt.data.data_ptr(), qt.data._version, qt.scale_inv._version)
    cached = getattr(layer, "_lowbit_cache", None)
    if cached is None or cached[0] != key:
        try:
            cached = (key, prepare_weight(qt))
        except ValueError:  # block / tensor scales: not a low-bit kernel layout
            cached = (key, None)
        object.__setattr__(layer, "_lowbit_cache", cached)  # a plain attribute, not a module buffer
    return cached[1]


def quantized_linear_kernel(layer, x: torch.Tensor):
    """The matmul hook of a quantized linear (`QuantizedLinear.kernel = quantized_linear_kernel`):
    runs the layer on the low-bit kernels on CUDA, or returns NotImplemented so the layer's reference
    forward runs (CPU, static activation scales, outlier channels, block / tensor weight scales)."""
    if not x.is_cuda or getattr(layer, "outlier_index", None) is not None:
        return NotImplemented
    spec = getattr(layer, "input_spec", None)
    if spec is not None and not spec.dynamic:
        return NotImplemented
    weight = _cached_lowbit(layer)
    if weight is None or (spec is None and weight.fmt.is_float):
        return NotImplemented
    y = lowbit_linear(x, weight, spec)
    bias = getattr(layer, "bias", None)
    return y if bias is None else y + bias.to(y.dtype)
