"""Compare the runs of a recipe sweep against the BF16 baseline: a table and two plots.

    python launch/train.py -m +recipe=bf16,v3_fp8,hybrid,blockwise trainer.max_steps=300
    python -m fp8train.sweep.compare multirun/<id> [--baseline bf16] [--out DIR] [--window 10]

writes to DIR (default: the sweep folder)
    compare.md        recipe | steps | final train loss | final val loss | gap to bf16 (%) | tokens/s
    loss_curves.png   training loss (moving average) and validation loss of every run over steps
    loss_gap.png      each recipe's relative loss gap to the baseline over steps

The relative gap is 100 * (loss - loss_baseline) / loss_baseline at the same step: +1 % means the
FP8 recipe's loss is 1 % above BF16's. Training losses are noisy step to step, so curves and the
"final train loss" use a trailing moving average over `--window` logged steps; validation losses
are compared as logged. When runs stop at different steps (one was preempted and is still
running), gaps use the last step both runs reached.

Each run is paired with a baseline run that has the same overrides apart from the recipe, so a
sweep over recipes x learning rates compares like with like; with a single baseline run, every
run is compared to it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from fp8train.sweep.runs import CompareError, Run, find_runs  # noqa: E402


def moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over up to `window` values (the first points average what exists)."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def relative_gap(steps: list[int], loss: list[float], base_steps: list[int],
                 base_loss: list[float]) -> tuple[list[int], list[float]]:
    """100 * (loss - base) / base on the steps both series have."""
    base = dict(zip(base_steps, base_loss))
    common = [(s, v) for s, v in zip(steps, loss) if s in base and base[s] != 0]
    return [s for s, _ in common], [100.0 * (v - base[s]) / base[s] for s, v in common]


def pair_baselines(runs: list[Run], baseline: str) -> dict[Path, Run | None]:
    """run path -> the baseline run to compare it with (None if no baseline has its overrides)."""
    bases = [r for r in runs if r.recipe == baseline]
    if not bases:
        recipes = sorted({r.recipe for r in runs})
        raise CompareError(f"no {baseline!r} run among the recipes {recipes}; "
                           f"pass --baseline with one of them")
    if len(bases) == 1:
        return {r.path: bases[0] for r in runs}
    by_key = {b.group_key: b for b in bases}
    return {r.path: by_key.get(r.group_key) for r in runs}


def labels(runs: list[Run], sweep_dir: Path) -> dict[Path, str]:
    """The recipe name, plus the run folder when several runs share a recipe."""
    counts: dict[str, int] = {}
    for run in runs:
        counts[run.recipe] = counts.get(run.recipe, 0) + 1
    return {r.path: r.recipe if counts[r.recipe] == 1 else f"{r.recipe} ({r.path.relative_to(sweep_dir)})"
            for r in runs}


def _last_common(gap: tuple[list[int], list[float]]) -> float | None:
    return gap[1][-1] if gap[0] else None


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def table_rows(runs: list[Run], pairs: dict[Path, Run | None], names: dict[Path, str],
               window: int) -> list[list[str]]:
    rows = []
    for run in runs:
        base = pairs[run.path]
        smooth = moving_average(run.train_loss, window)
        train_gap = val_gap = None
        if base is not None:
            train_gap = _last_common(relative_gap(run.steps, smooth, base.steps,
                                                  moving_average(base.train_loss, window)))
            val_gap = _last_common(relative_gap(run.val_steps, run.val_loss, base.val_steps, base.val_loss))
        rows.append([names[run.path], str(run.steps[-1]), f"{smooth[-1]:.4f}",
                     _fmt(run.val_loss[-1] if run.val_loss else None, ".4f"),
                     _fmt(train_gap, "+.2f"), _fmt(val_gap, "+.2f"),
                     _fmt(run.tokens_per_s, ",.0f"), run.status])
    return rows


def markdown(runs: list[Run], pairs, names, baseline: str, window: int, sweep_dir: Path) -> str:
    header = ["recipe", "steps", f"final train loss (mean of last {window})", "final val loss",
              f"train gap to {baseline} (%)", f"val gap to {baseline} (%)", "tokens/s", "status"]
    lines = [f"# Sweep {sweep_dir}", "",
             f"Gap = 100 * (loss - {baseline} loss) / {baseline} loss at the last step both runs "
             "reached; positive means worse than the baseline.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(runs, pairs, names, window)]
    return "\n".join(lines) + "\n"


def plot_curves(runs: list[Run], names, window: int, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 5))
    for run in runs:
        line, = ax.plot(run.steps, moving_average(run.train_loss, window), label=f"{names[run.path]} train")
        if run.val_steps:
            ax.plot(run.val_steps, run.val_loss, "o--", color=line.get_color(), label=f"{names[run.path]} val")
    ax.set(xlabel="step", ylabel="loss", title=f"Loss curves (train: moving average over {window} steps)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_gaps(runs: list[Run], pairs, names, baseline: str, window: int, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 5))
    ax.axhline(0.0, color="black", linewidth=0.8, label=baseline)
    for run in runs:
        base = pairs[run.path]
        if base is None or base is run:
            continue
        steps, gap = relative_gap(run.steps, moving_average(run.train_loss, window),
                                  base.steps, moving_average(base.train_loss, window))
        line, = ax.plot(steps, gap, label=f"{names[run.path]} train")
        val_steps, val_gap = relative_gap(run.val_steps, run.val_loss, base.val_steps, base.val_loss)
        if val_steps:
            ax.plot(val_steps, val_gap, "o--", color=line.get_color(), label=f"{names[run.path]} val")
    ax.set(xlabel="step", ylabel=f"relative loss gap to {baseline} (%)",
           title="Relative loss gap: 100 * (loss - baseline) / baseline")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def compare(sweep_dir: Path, baseline: str = "bf16", out_dir: Path | None = None,
            window: int = 10) -> dict[str, Path]:
    """Write compare.md, loss_curves.png and loss_gap.png; return their paths."""
    if window < 1:
        raise CompareError(f"--window {window}: the moving average needs at least 1 step")
    runs = find_runs(sweep_dir)
    pairs = pair_baselines(runs, baseline)
    names = labels(runs, sweep_dir)
    out_dir = out_dir or sweep_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    outputs = {"table": out_dir / "compare.md", "curves": out_dir / "loss_curves.png",
               "gaps": out_dir / "loss_gap.png"}
    outputs["table"].write_text(markdown(runs, pairs, names, baseline, window, sweep_dir))
    plot_curves(runs, names, window, outputs["curves"])
    plot_gaps(runs, pairs, names, baseline, window, outputs["gaps"])
    return outputs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fp8train.sweep.compare",
                                     description="Table and plots of a sweep's runs against a baseline recipe.")
    parser.add_argument("sweep_dir", type=Path, help="a multirun folder, e.g. multirun/<id>")
    parser.add_argument("--baseline", default="bf16", help="recipe the others are compared to")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: sweep_dir)")
    parser.add_argument("--window", type=int, default=10, help="moving-average window for train loss")
    args = parser.parse_args(argv)
    try:
        outputs = compare(args.sweep_dir, args.baseline, args.out, args.window)
    except CompareError as error:
        print(f"compare: error: {error}", file=sys.stderr)
        return 2
    print(outputs["table"].read_text())
    print("wrote " + ", ".join(str(p) for p in outputs.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
