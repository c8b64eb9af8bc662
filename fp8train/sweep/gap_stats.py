"""Statistics of a recipes x seeds study: how much validation loss a recipe costs, with error bars.

Each recipe r was trained with the same seeds as the baseline b (same initial weights, same data
order), so the natural comparison is PAIRED BY SEED. For every seed s both ran,

    gap_s = 100 * (L[r, s] - L[b, s]) / L[b, s]          relative final-validation-loss gap, %

and the reported gap is mean(gap_s) with a two-sided Student-t confidence interval

    mean +- t_{1 - alpha/2, n - 1} * sd(gap_s) / sqrt(n)          (n seeds, sample sd, ddof = 1)

Pairing removes the seed-to-seed variation the two runs share (init, data order), so the interval
is usually much narrower than the unpaired spread of either recipe (reported too, as mean +- sd of
the final losses, and as `baseline seed sd %`: how far two BF16 seeds are apart). The interval
needs n >= 2 seeds; with one seed it is reported as unavailable, never as zero. The t-interval
assumes the per-seed gaps are roughly normal, which holds well for averaged validation losses;
with very few seeds (n = 2: t = 12.7) it is honest but wide, which is the point.

`resolution(...)` answers the planning question: with this many seeds and this per-seed gap sd,
what is the half-width of the interval, i.e. the smallest gap the study can tell from zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from scipy import stats


@dataclass(frozen=True)
class Spread:
    """mean +- sample sd of n values (sd is None when n < 2)."""

    n: int
    mean: float
    sd: float | None

    def __str__(self) -> str:
        return f"{self.mean:.4f}" if self.sd is None else f"{self.mean:.4f} +- {self.sd:.4f}"


@dataclass(frozen=True)
class PairedGap:
    """The relative gap of one recipe to the baseline, paired by seed (percent)."""

    recipe: str
    seeds: tuple[int, ...]
    per_seed: tuple[float, ...]
    mean: float
    sd: float | None
    ci_low: float | None
    ci_high: float | None
    confidence: float

    @property
    def half_width(self) -> float | None:
        return None if self.ci_high is None else (self.ci_high - self.ci_low) / 2

    @property
    def resolved(self) -> bool:
        """True when the interval excludes zero (the gap is told apart from seed noise)."""
        return self.ci_low is not None and (self.ci_low > 0 or self.ci_high < 0)


def spread(values: list[float]) -> Spread:
    if not values:
        raise ValueError("spread of no values: every run of this recipe failed or is missing")
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return Spread(n, mean, sd)


def t_quantile(confidence: float, n: int) -> float:
    """Two-sided Student-t critical value for n samples (n - 1 degrees of freedom)."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence={confidence} must be in (0, 1), e.g. 0.95")
    if n < 2:
        raise ValueError(f"a t-interval needs at least 2 seeds, got {n}")
    return float(stats.t.ppf(0.5 + confidence / 2, n - 1))


def relative_gap(loss: float, base: float) -> float:
    return 100.0 * (loss - base) / base


def paired_gap(recipe: str, losses: dict[int, float], base_losses: dict[int, float],
               confidence: float = 0.95) -> PairedGap:
    """Gap of `losses` (seed -> final val loss) to `base_losses`, over the seeds both have."""
    seeds = tuple(sorted(set(losses) & set(base_losses)))
    if not seeds:
        raise ValueError(f"recipe {recipe!r} shares no seed with the baseline (its seeds "
                         f"{sorted(losses)}, the baseline's {sorted(base_losses)})")
    gaps = tuple(relative_gap(losses[s], base_losses[s]) for s in seeds)
    summary = spread(list(gaps))
    low = high = None
    if summary.sd is not None:
        half = t_quantile(confidence, summary.n) * summary.sd / math.sqrt(summary.n)
        low, high = summary.mean - half, summary.mean + half
    return PairedGap(recipe, seeds, gaps, summary.mean, summary.sd, low, high, confidence)


def resolution(gap_sd: float, seeds: int, confidence: float = 0.95) -> float:
    """Half-width (percent) of the paired t-interval for `seeds` seeds and a per-seed gap sd."""
    return t_quantile(confidence, seeds) * gap_sd / math.sqrt(seeds)


def band(values_by_seed: list[list[float]], confidence: float = 0.95) -> tuple[list[float], list[float]]:
    """Pointwise mean and t-interval half-width over seeds (lists of equal length; 0 if n < 2)."""
    n = len(values_by_seed)
    columns = list(zip(*values_by_seed))
    means = [sum(c) / n for c in columns]
    if n < 2:
        return means, [0.0] * len(means)
    t = t_quantile(confidence, n)
    halves = [t * math.sqrt(sum((v - m) ** 2 for v in c) / (n - 1)) / math.sqrt(n)
              for c, m in zip(columns, means)]
    return means, halves
