"""loss_gap.png of a recipes x seeds study: validation loss and its gap to the baseline, with bands.

Left panel: each recipe's validation loss over steps, mean over seeds with a t-interval band.
Right panel: each recipe's relative gap to the baseline, paired by seed (gap_s(step) =
100 * (L[r, s] - L[b, s]) / L[b, s] at every evaluated step), mean with a t-interval band, and the
0.25 % line that DeepSeek-V3 reports as its FP8 loss error. Bands need >= 2 seeds.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from fp8train.sweep.gap_stats import band, relative_gap  # noqa: E402

Curves = dict[int, dict[int, float]]  # seed -> {step: val loss}


def _common_steps(curves: Curves, seeds) -> list[int]:
    steps = None
    for seed in seeds:
        have = set(curves[seed])
        steps = have if steps is None else steps & have
    return sorted(steps or ())


def _draw(ax, steps, series: list[list[float]], label: str, confidence: float) -> None:
    if not steps or not series:
        return
    means, halves = band(series, confidence)
    line, = ax.plot(steps, means, marker="o", markersize=3, label=f"{label} (n={len(series)})")
    low = [m - h for m, h in zip(means, halves)]
    high = [m + h for m, h in zip(means, halves)]
    ax.fill_between(steps, low, high, color=line.get_color(), alpha=0.2)


def plot_study(curves: dict[str, Curves], baseline: str, path: Path, confidence: float = 0.95) -> Path:
    """curves: recipe label -> seed -> {step: val loss}. Writes and returns `path`."""
    fig, (ax_loss, ax_gap) = plt.subplots(1, 2, figsize=(13, 5))
    base = curves.get(baseline, {})
    for label, by_seed in curves.items():
        seeds = sorted(by_seed)
        steps = _common_steps(by_seed, seeds)
        _draw(ax_loss, steps, [[by_seed[s][t] for t in steps] for s in seeds], label, confidence)
        if label == baseline:
            continue
        paired = [s for s in seeds if s in base]
        steps = [t for t in _common_steps(by_seed, paired) if all(t in base[s] for s in paired)]
        gaps = [[relative_gap(by_seed[s][t], base[s][t]) for t in steps] for s in paired]
        _draw(ax_gap, steps, gaps, label, confidence)
    pct = int(round(confidence * 100))
    ax_loss.set(xlabel="step", ylabel="validation loss", title=f"Validation loss (mean, {pct}% t-band over seeds)")
    ax_gap.axhline(0.0, color="black", linewidth=0.8)
    ax_gap.axhline(0.25, color="grey", linestyle=":", linewidth=1.0, label="+0.25% (DeepSeek-V3 bar)")
    ax_gap.set(xlabel="step", ylabel=f"gap to {baseline} (%)",
               title=f"Relative gap to {baseline}, paired by seed ({pct}% t-band)")
    for ax in (ax_loss, ax_gap):
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
