"""Group padding: the TE grouped backend's pad_groups (exact round trip, gradients) and the native
FP8 grouped layouts (device-computed offsets and row index, a static row count, zero padding)."""

from itertools import accumulate

import pytest
import torch

from fp8train.numerics.grouped_layout import (gather_to_padded, group_ends, padded_bound, padded_groups,
                                              scatter_rows, token_pad)
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


def test_padded_groups_place_each_group_at_an_aligned_start():
    sizes = [0, 3, 17, 130]
    groups = padded_groups(torch.tensor(sizes), sum(sizes), 16)
    assert groups.offs.dtype == torch.int32 and groups.offs.tolist() == [0, 16, 48, 192]
    assert groups.rows == padded_bound(150, 4, 16) == 224  # static: any split of 150 rows fits
    expected = torch.cat([torch.arange(3), torch.arange(17) + 16, torch.arange(130) + 48])
    assert torch.equal(groups.dest_rows, expected)


def test_padded_groups_index_matches_te_pad_groups():
    sizes = [5, 0, 17, 15, 1]
    x = torch.randn(sum(sizes), 8)
    for multiple in (16, 128):
        groups = padded_groups(torch.tensor(sizes, dtype=torch.int32), sum(sizes), multiple)
        x_padded, padded_sizes, rows = pad_groups(x, sizes, multiple)
        assert groups.offs.tolist() == list(accumulate(padded_sizes)) and torch.equal(groups.dest_rows, rows)
        scattered = scatter_rows(x, groups)
        assert scattered.shape == (groups.rows, 8)
        assert torch.equal(scattered[:x_padded.shape[0]], x_padded)
        assert torch.count_nonzero(scattered[x_padded.shape[0]:]) == 0


def test_scatter_rows_round_trip_and_zero_padding():
    sizes = [7, 0, 33]
    x = torch.randn(40, 6, dtype=torch.bfloat16)
    groups = padded_groups(torch.tensor(sizes), 40, 16)
    x_padded = scatter_rows(x, groups)
    assert x_padded.shape == (padded_bound(40, 3, 16), 6) and x_padded.dtype == torch.bfloat16
    assert torch.equal(x_padded[groups.dest_rows], x)
    mask = torch.ones(x_padded.shape[0], dtype=torch.bool)
    mask[groups.dest_rows] = False
    assert torch.count_nonzero(x_padded[mask]) == 0


@pytest.mark.parametrize("seed", range(5))
def test_the_static_bound_fits_every_routing(seed):
    """The worst case: every group one row past a multiple of 128."""
    gen = torch.Generator().manual_seed(seed)
    sizes = torch.randint(0, 400, (9,), generator=gen)
    sizes[:4] = torch.tensor([1, 129, 257, 0])
    groups = padded_groups(sizes, int(sizes.sum()), 128)
    assert int(groups.offs[-1]) <= groups.rows and groups.rows % 128 == 0
    assert int(groups.dest_rows.max()) < groups.rows


def test_group_ends_and_token_pad():
    assert group_ends(torch.tensor([3, 0, 5])).tolist() == [3, 3, 8]
    assert group_ends(torch.tensor([3, 0, 5])).dtype == torch.int32
    assert [token_pad(t) for t in (1, 16, 17, 256)] == [16, 16, 32, 256]


def test_gather_to_padded_is_scatter_of_the_gathered_rows():
    x = torch.randn(10, 5, dtype=torch.bfloat16)
    token_index = torch.tensor([3, 3, 0, 9, 1, 2, 2, 7])
    groups = padded_groups(torch.tensor([2, 0, 5, 1]), 8, 16)
    assert torch.equal(gather_to_padded(x, token_index, groups), scatter_rows(x[token_index], groups))
