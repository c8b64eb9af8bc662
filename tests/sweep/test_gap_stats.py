"""The study's statistics on numbers whose answers are known in closed form."""

from __future__ import annotations

import math

import pytest

from fp8train.sweep import gap_stats

T_975_DOF1 = 12.706204736174698   # Student-t 97.5% quantile, 1 degree of freedom (tables)
T_975_DOF2 = 4.302652729749464


def test_paired_gap_two_seeds_exact():
    gap = gap_stats.paired_gap("fp8", {1: 2.02, 2: 2.04}, {1: 2.0, 2: 2.0})
    assert gap.seeds == (1, 2)
    assert gap.per_seed == pytest.approx((1.0, 2.0))
    assert gap.mean == pytest.approx(1.5)
    assert gap.sd == pytest.approx(math.sqrt(0.5))
    half = T_975_DOF1 * math.sqrt(0.5) / math.sqrt(2)
    assert (gap.ci_low, gap.ci_high) == pytest.approx((1.5 - half, 1.5 + half))
    assert not gap.resolved  # two seeds: t = 12.7, the interval spans zero


def test_paired_gap_pairs_by_seed_not_by_mean():
    """A constant +1 % per seed is resolved exactly even when seeds differ a lot from each other."""
    base = {1: 2.0, 2: 3.0, 3: 4.0}
    gap = gap_stats.paired_gap("fp8", {s: 1.01 * v for s, v in base.items()}, base)
    assert gap.mean == pytest.approx(1.0)
    assert gap.sd == pytest.approx(0.0, abs=1e-9)
    assert gap.resolved


def test_three_seeds_interval_and_resolution():
    gap = gap_stats.paired_gap("fp8", {1: 1.01, 2: 1.02, 3: 1.03, 9: 5.0}, {1: 1.0, 2: 1.0, 3: 1.0})
    assert gap.seeds == (1, 2, 3)  # seed 9 has no baseline partner
    assert gap.half_width == pytest.approx(T_975_DOF2 * 1.0 / math.sqrt(3))
    assert gap_stats.resolution(1.0, 3) == pytest.approx(gap.half_width)
    assert not gap.resolved  # +2 % +- 2.48 %: three seeds of this spread cannot exclude zero


def test_one_seed_has_no_interval():
    gap = gap_stats.paired_gap("fp8", {1: 2.1}, {1: 2.0})
    assert gap.mean == pytest.approx(5.0)
    assert gap.sd is None and gap.ci_low is None and not gap.resolved


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="shares no seed"):
        gap_stats.paired_gap("fp8", {1: 2.0}, {2: 2.0})
    with pytest.raises(ValueError, match="at least 2 seeds"):
        gap_stats.t_quantile(0.95, 1)
    with pytest.raises(ValueError, match="confidence"):
        gap_stats.t_quantile(95, 3)
    with pytest.raises(ValueError, match="every run of this recipe failed"):
        gap_stats.spread([])


def test_band_pointwise():
    means, halves = gap_stats.band([[1.0, 2.0], [3.0, 2.0]])
    assert means == pytest.approx([2.0, 2.0])
    assert halves == pytest.approx([T_975_DOF1 * math.sqrt(2.0) / math.sqrt(2), 0.0])
    assert gap_stats.band([[1.0, 2.0]]) == ([1.0, 2.0], [0.0, 0.0])
