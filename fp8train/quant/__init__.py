"""fp8train's quantization core: one set of rules for FP8 training, PTQ, the KV cache and QAT.

    formats       NumberFormat: E4M3, E5M2 (FP8), INT8, UINT8, INT4, UINT4
    granularity   Granularity: tensor / row / tile 1xG / block GxG (which elements share a scale)
    scaling       ScalingMode (delayed / current / static) and the scale rules (amax -> scale,
                  integer grids, the delayed-scaling update)
    tensor        QuantizedTensor: codes + scale_inv (+ zero point), dequantize, transpose, slices
    reference     THE pure-torch quantizers; every kernel is tested bit for bit against them
    schemes       the table: recipe scaling -> mode, granularity, transposed reuse, kernels
    casts         fast casts: the table's Triton kernels on CUDA, the reference elsewhere
    packing       4-bit codes two to a byte
    spec          QuantSpec: a quantizer as data (PTQ, QAT and KV-cache presets)

Imports torch only (and, lazily, the Triton kernels in kernels/). See docs/ARCHITECTURE.md.
"""

from fp8train.quant.formats import (E4M3, E5M2, FORMATS, FP8_FORMATS, INT4, INT8, UINT4, UINT8, FormatKind,
                                    NumberFormat, fp8_format, get_format)
from fp8train.quant.granularity import Granularity, GranularityKind
from fp8train.quant.reference import (fake_quantize, quantize, quantize_with_scale,
                                      quantize_with_step, saturating_cast)
from fp8train.quant.scaling import ScalingMode, delayed_scale_update, scale_from_amax, tensor_amax
from fp8train.quant.schemes import BLOCK, SCHEMES, CastScheme, GemmClass, RecipeScaling, scheme_for
from fp8train.quant.tensor import QuantizedTensor

__all__ = [
    "BLOCK", "E4M3", "E5M2", "FORMATS", "FP8_FORMATS", "INT4", "INT8", "SCHEMES", "UINT4", "UINT8", "CastScheme",
    "FormatKind", "GemmClass", "Granularity", "GranularityKind", "NumberFormat", "QuantizedTensor", "RecipeScaling",
    "ScalingMode", "delayed_scale_update", "fake_quantize", "fp8_format", "get_format",
    "quantize", "quantize_with_scale", "quantize_with_step", "saturating_cast", "scale_from_amax", "scheme_for",
    "tensor_amax",
]
