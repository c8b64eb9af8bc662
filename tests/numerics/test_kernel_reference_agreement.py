"""The two statements of the FP8 cast semantics agree bit for bit: fp8train.numerics (the CPU and
emulated path) and kernels.reference (what the Triton kernels, used on CUDA, are tested against).
If they drifted apart, CPU runs and GPU runs would quantize differently."""

import pytest
import torch

from fp8train.numerics.formats import E4M3, E5M2
from fp8train.numerics.quantize import quantize_blocks, quantize_tensorwise, quantize_tiles
from fp8train.numerics.scaling import delayed_scale_update, scale_from_amax, tensor_amax
from kernels import reference


def _bits(t):
    return t.contiguous().view(torch.uint8)


def _input(dtype):
    torch.manual_seed(0)
    x = torch.randn(256, 384) * torch.logspace(-6, 3, 384)  # every column its own magnitude
    x[0, :128] = 0.0  # a zero tile
    x[5, 7] = 1e6  # beyond both formats' max
    return x.to(dtype)


@pytest.mark.parametrize("fmt", [E4M3, E5M2])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("power_of_2", [False, True])
def test_tiles_blocks_and_current_agree(fmt, dtype, power_of_2):
    x = _input(dtype)
    ours = quantize_tiles(x, fmt, power_of_2)
    q, scale_inv = reference.quantize_1x128(x, fmt.dtype, power_of_2)
    assert torch.equal(_bits(ours.data), _bits(q)) and torch.equal(ours.scale_inv, scale_inv)
    ours_t = quantize_tiles(x.t(), fmt, power_of_2)
    q_t, scale_inv_t = reference.quantize_1x128_t(x, fmt.dtype, power_of_2)
    assert torch.equal(_bits(ours_t.data), _bits(q_t)) and torch.equal(ours_t.scale_inv, scale_inv_t)
    ours_b = quantize_blocks(x, fmt, power_of_2)
    q_b, scale_inv_b = reference.quantize_128x128(x, fmt.dtype, power_of_2)
    assert torch.equal(_bits(ours_b.data), _bits(q_b)) and torch.equal(ours_b.scale_inv, scale_inv_b)
    current = quantize_tensorwise(x, fmt, scale_from_amax(tensor_amax(x), fmt.max, power_of_2))
    q_c, _, scale_inv_c = reference.current_cast(x, fmt.dtype, power_of_2, False)
    assert torch.equal(_bits(current.data), _bits(q_c))
    assert torch.equal(current.scale_inv.reshape(1), scale_inv_c.reshape(1))


@pytest.mark.parametrize("fmt", [E4M3, E5M2])
def test_delayed_cast_and_update_agree(fmt):
    x = _input(torch.bfloat16)
    scale = torch.tensor([3.0])
    q, _, amax = reference.cast_with_amax(x, scale, fmt.dtype, False)
    assert torch.equal(_bits(quantize_tensorwise(x, fmt, scale).data), _bits(q))
    assert torch.equal(tensor_amax(x).reshape(1), amax.reshape(1))
    history = torch.tensor([[0.0, 2.0, 5.0], [float("nan"), 1.0, 1.0], [0.0, 0.0, 0.0], [7.0, 0.0, 1.0]])
    old = torch.tensor([1.0, 2.0, 4.0, 8.0])
    fmax = torch.full((4,), fmt.max)
    for algo in ("max", "most_recent"):
        h, s, s_inv = delayed_scale_update(history, old, fmax, 1.0, algo)
        h_ref, s_ref, s_inv_ref = history.clone(), old.clone(), torch.empty(4)
        reference.delayed_scaling_update(h_ref, s_ref, s_inv_ref, fmax, 1.0, algo)
        for ours, theirs in ((h, h_ref), (s, s_ref), (s_inv, s_inv_ref)):  # exact, NaN == NaN
            torch.testing.assert_close(ours, theirs, rtol=0, atol=0, equal_nan=True)
