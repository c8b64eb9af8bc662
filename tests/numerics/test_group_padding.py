"""Group padding used by the TE grouped backend: exact round trip and gradients."""

import torch

from fp8train.numerics.te_backend import pad_groups


def test_pad_groups_round_trip_and_multiples():
    x = torch.randn(37, 8)
    sizes = [5, 0, 17, 15]
    x_padded, padded_sizes, rows = pad_groups(x, sizes, 16)
    assert padded_sizes == [16, 0, 32, 16]
    assert x_padded.shape == (64, 8)
    assert torch.equal(x_padded[rows], x)
    mask = torch.ones(64, dtype=torch.bool)
    mask[rows] = False
    assert torch.count_nonzero(x_padded[mask]) == 0  # padding rows are exactly zero


def test_pad_groups_is_differentiable():
    x = torch.randn(20, 4, requires_grad=True)
    x_padded, _, rows = pad_groups(x, [3, 17], 16)
    (x_padded.index_select(0, rows) * 2).sum().backward()
    assert torch.equal(x.grad, torch.full_like(x, 2.0))
