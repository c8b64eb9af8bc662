"""Which implementation runs a kernel call: Triton (compiled or interpreted) or the torch fallback.

Three answers, each with a printable reason (`kernel_backend(x)` -> (name, reason)):

* "triton"      CUDA tensor on compute capability >= 9.0: compiled kernels, and the FP32 -> FP8
                conversion is the hardware `cvt.rn.satfinite` instruction (round to nearest even).
* "triton-soft" CUDA below 9.0, or TRITON_INTERPRET=1 (CPU tensors): the same kernels with the FP8
                rounding done in integer arithmetic. Below sm_90 Triton converts FP32 -> FP8 through
                an FP16 truncation (double rounding), and the interpreter's FP8 conversion rounds
                ties away from zero, so neither matches `tensor.to(fp8)` bit for bit.
* "reference"   anything else (CPU without the interpreter, Triton missing): `kernels.fallback`,
                the core's reference quantizers.

Triton decides interpreted-or-compiled when a kernel is decorated, i.e. when its module is first
imported, from TRITON_INTERPRET. The kernel modules are therefore imported lazily, at the first
call, and record that decision (`kernels.fp8_triton.INTERPRETED`), which this module reads back.
"""

from __future__ import annotations

import functools
import importlib.util

import torch

TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None


@functools.lru_cache(maxsize=None)
def _capability(device_index: int) -> tuple[int, int]:
    """Asked once per device: this runs on every cast, on the host's critical path."""
    return torch.cuda.get_device_capability(device_index)


def capability(x: torch.Tensor) -> tuple[int, int]:
    """Compute capability of CUDA tensor x's device (cached per device)."""
    return _capability(x.device.index if x.device.index is not None else torch.cuda.current_device())


def kernel_backend(x: torch.Tensor) -> tuple[str, str]:
    """(backend name, reason) for a call whose main input is `x`."""
    if not TRITON_AVAILABLE:
        return "reference", "triton is not installed"
    from kernels import fp8_triton  # first import decorates the shared helpers

    if fp8_triton.INTERPRETED:
        return "triton-soft", "TRITON_INTERPRET=1 when kernels were first imported: interpreter"
    if not x.is_cuda:
        return "reference", f"{x.device} tensor and the Triton interpreter is off"
    major, minor = capability(x)
    if (major, minor) >= (9, 0):
        return "triton", f"sm_{major}{minor}: compiled Triton, hardware FP8 conversion"
    return "triton-soft", f"sm_{major}{minor} < sm_90: compiled Triton, FP8 rounding in integer ops"
