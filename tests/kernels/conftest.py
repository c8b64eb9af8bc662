"""Kernel tests run the Triton kernels on CPU tensors through the interpreter when no GPU exists.

Triton decides interpreted-or-compiled when a kernel is decorated (its module's first import), so
TRITON_INTERPRET must be set before `kernels.tensorwise` & co. are imported; `kernels` imports them
lazily, at the first call, which happens after this conftest has run. On a CUDA machine nothing is
set and the same tests run the compiled kernels on the GPU.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def fp8_capable_cuda() -> tuple[bool, str]:
    """(ok, reason): a CUDA device with compute capability >= 8.9."""
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) < (8, 9):
        return False, f"compute capability {major}.{minor} < 8.9"
    return True, ""


@pytest.fixture(scope="session")
def device() -> str:
    """Where the small-shape tests run the kernels: the GPU if there is one, else the interpreter."""
    return "cuda" if fp8_capable_cuda()[0] else "cpu"


@pytest.fixture(autouse=True)
def _skip_gpu_tests(request):
    if request.node.get_closest_marker("gpu") is not None:
        ok, reason = fp8_capable_cuda()
        if not ok:
            pytest.skip(f"gpu test: {reason}")
