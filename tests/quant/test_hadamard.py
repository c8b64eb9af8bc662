"""The randomized Hadamard rotation against the explicit float64 matrix (Sylvester construction)."""

import math

import pytest
import torch

from fp8train.quant.hadamard import (hadamard_matrix, hadamard_transform, inverse_hadamard_transform,
                                     random_signs)


def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


@pytest.mark.parametrize("n", [2, 32, 64, 128])
def test_transform_is_the_orthogonal_matrix_h_diag_s_over_sqrt_n(n):
    signs = random_signs(n, seed=3)
    x = torch.randn(5, 7, n)
    rotation = _sylvester(n) * signs.double() / math.sqrt(n)  # R = H diag(s) / sqrt(n)
    expected = x.double() @ rotation.t()
    torch.testing.assert_close(hadamard_transform(x, signs).double(), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(rotation @ rotation.t(), torch.eye(n, dtype=torch.float64))
    torch.testing.assert_close(inverse_hadamard_transform(hadamard_transform(x, signs), signs), x, rtol=0, atol=1e-5)
    assert torch.equal(random_signs(n, seed=3), signs) and set(signs.tolist()) <= {-1.0, 1.0}


def test_dot_products_survive_and_outlier_channels_spread():
    signs = random_signs(64)
    q, k = torch.randn(10, 64), torch.randn(10, 64)
    k[:, 5] = 40.0  # one outlier channel
    rq, rk = hadamard_transform(q, signs), hadamard_transform(k, signs)
    torch.testing.assert_close((rq * rk).sum(-1), (q * k).sum(-1), rtol=1e-5, atol=1e-4)
    assert k.abs().amax(-1).div(k.norm(dim=-1)).min() > 0.9  # before: one channel holds the energy
    assert rk.abs().amax(-1).div(rk.norm(dim=-1)).max() < 0.4  # after: spread over all 64
    torch.testing.assert_close(q @ hadamard_matrix(signs), rq, rtol=0, atol=1e-5)


def test_sizes_that_are_not_powers_of_two_are_refused():
    with pytest.raises(ValueError, match="power-of-2 size >= 2, got 48"):
        hadamard_transform(torch.randn(2, 48), torch.ones(48))
