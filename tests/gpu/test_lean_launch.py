"""The lean Triton launch path (kernels/launcher.py) gives the same bytes as the JIT path, on the GPU.

Every case is run several times: the first call compiles through the JIT, the later ones take the
direct launch; all must equal the torch reference bit for bit. Shapes cover what Triton
specializes on (a dimension of 1, dimensions not divisible by 16, an input pointer that is not
16-byte aligned), so a key that missed one of them would launch a binary compiled for other
assumptions and show up here as wrong bytes.
"""

import pytest
import torch

import kernels
from fp8train.quant.formats import FLT_MAX
from kernels import fallback as reference
from tests.kernels.conftest import fp8_capable_cuda

ok, why = fp8_capable_cuda()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not ok, reason=why)]


def _input(m, k, misaligned):
    if not misaligned:
        return torch.randn(m, k, device="cuda").mul_(3).to(torch.bfloat16)
    flat = torch.randn(m * k + 1, device="cuda").mul_(3).to(torch.bfloat16)
    return flat[1:].view(m, k)  # contiguous, 2 bytes past a 16-byte boundary


def _equal(a, b):
    if a is None or b is None:
        return a is b
    if a.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        return torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    return torch.equal(a, b)


@pytest.mark.parametrize("m,k,misaligned", [(4096, 2048, False), (1, 256, False), (100, 48, False),
                                            (33, 130, False), (512, 256, True)])
@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_lean_launches_equal_the_reference(m, k, misaligned, fp8):
    from kernels import tensorwise

    x = _input(m, k, misaligned)
    scale = torch.tensor([3.5], device="cuda")
    before = tensorwise._CAST_LAUNCH.lean_launches + tensorwise._AMAX_LAUNCH.lean_launches
    for _ in range(3):
        for got, want in ((kernels.cast_with_amax(x, scale, fp8, True), reference.cast_with_amax(x, scale, fp8, True)),
                          (kernels.current_cast(x, fp8, False, True), reference.current_cast(x, fp8, False, True))):
            assert all(_equal(g, w) for g, w in zip(got, want))
    after = tensorwise._CAST_LAUNCH.lean_launches + tensorwise._AMAX_LAUNCH.lean_launches
    assert after > before, "the repeated calls should have taken the direct launch"
