"""FP8 quantization kernels (Triton), bit-identical to the quantization core's reference.

    from kernels import cast_with_amax, current_cast, quantize_1x128, quantize_128x128, gather_rows, ...
    from kernels import grouped_mm_experts_tensorwise, grouped_mm_tokens_blockwise, ...  # MoE GEMMs

Each function runs Triton on CUDA (or under TRITON_INTERPRET=1) and `kernels.fallback` (the
quantization core's reference in the kernels' layouts) otherwise; `kernel_backend(x)` says which
and why. Importing this package never needs Triton.
"""

FP8TRAIN_KERNELS = True  # marks fp8train's own package (PyPI has another package named `kernels`)

from kernels._backend import kernel_backend
from kernels.grouped_gemm_ops import (
    grouped_backend,
    grouped_mm_experts_blockwise,
    grouped_mm_experts_tensorwise,
    grouped_mm_tokens_blockwise,
    grouped_mm_tokens_tensorwise,
)
from kernels.ops import (
    cast_with_amax,
    cast_with_amax_tiles,
    current_cast,
    delayed_cast,
    delayed_scaling_update,
    gather_rows,
    quantize_1x128,
    quantize_1x128_both,
    quantize_1x128_t,
    quantize_128x128,
    quantize_128x128_both,
)

__all__ = [
    "cast_with_amax",
    "cast_with_amax_tiles",
    "current_cast",
    "delayed_cast",
    "delayed_scaling_update",
    "gather_rows",
    "grouped_backend",
    "grouped_mm_experts_blockwise",
    "grouped_mm_experts_tensorwise",
    "grouped_mm_tokens_blockwise",
    "grouped_mm_tokens_tensorwise",
    "kernel_backend",
    "quantize_1x128",
    "quantize_1x128_both",
    "quantize_1x128_t",
    "quantize_128x128",
    "quantize_128x128_both",
]
