"""CUDA-graph preparation of FP8 layers (CPU-checkable parts; the replay itself: tests/gpu)."""

import pytest
import torch

from fp8train.numerics import FP8Linear, load_recipe, make_graphed_fp8


def test_uncached_weight_is_cast_on_every_call():
    """cache_weight=False is what a graph replay relies on: no call may reuse an earlier cast."""
    layer = FP8Linear(32, 16, recipe=load_recipe("hybrid"), backend="emulated")
    x = torch.randn(8, 32)
    layer(x), layer(x)
    assert layer.weight_casts == 1, "cached by default: one cast per optimizer step"
    layer.cache_weight = False
    layer(x), layer(x)
    assert layer.weight_casts == 3


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_make_graphed_fp8_needs_cuda():
    layer = FP8Linear(32, 16, recipe=load_recipe("hybrid"), backend="emulated")
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        make_graphed_fp8(layer, (torch.randn(8, 32),))
