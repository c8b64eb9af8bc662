"""Group padding: the TE grouped backend's pad_groups (exact round trip, gradients) and the native
FP8 grouped function's aligned layout (device-computed row index, one scatter, zero padding)."""

import torch

from fp8train.numerics.grouped_layout import align_groups, scatter_to_padded
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


def test_align_groups_places_each_group_at_an_aligned_start():
    sizes = [0, 3, 17, 130]
    groups = align_groups(torch.tensor(sizes), sizes, 16)
    assert groups.padded_sizes == [0, 16, 32, 144] and groups.padded_starts == [0, 0, 16, 48]
    assert groups.total == 192
    assert list(groups.spans()) == [(1, 0, 3, 16), (2, 16, 17, 32), (3, 48, 130, 144)]
    expected = torch.cat([torch.arange(3), torch.arange(17) + 16, torch.arange(130) + 48])
    assert torch.equal(groups.dest_rows, expected)


def test_align_groups_index_matches_te_pad_groups():
    sizes = [5, 0, 17, 15, 1]
    x = torch.randn(sum(sizes), 8)
    for multiple in (16, 128):
        groups = align_groups(torch.tensor(sizes, dtype=torch.int32), sizes, multiple)
        x_padded, padded_sizes, rows = pad_groups(x, sizes, multiple)
        assert groups.padded_sizes == padded_sizes and torch.equal(groups.dest_rows, rows)
        assert torch.equal(scatter_to_padded(x, groups), x_padded)


def test_scatter_to_padded_round_trip_and_zero_padding():
    sizes = [7, 0, 33]
    x = torch.randn(40, 6, dtype=torch.bfloat16)
    groups = align_groups(torch.tensor(sizes), sizes, 16)
    x_padded = scatter_to_padded(x, groups)
    assert x_padded.shape == (64, 6) and x_padded.dtype == torch.bfloat16
    assert torch.equal(x_padded[groups.dest_rows], x)
    mask = torch.ones(64, dtype=torch.bool)
    mask[groups.dest_rows] = False
    assert torch.count_nonzero(x_padded[mask]) == 0


def test_already_aligned_groups_need_no_copy():
    sizes = [16, 0, 32]
    x = torch.randn(48, 4)
    groups = align_groups(torch.tensor(sizes), sizes, 16)
    assert groups.dest_rows is None and groups.total == 48
    assert scatter_to_padded(x, groups) is x
