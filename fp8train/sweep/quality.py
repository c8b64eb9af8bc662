"""The FP8-vs-BF16 loss-gap study: recipes x seeds through the real trainer, gaps with error bars.

    python -m fp8train.sweep.quality --out studies/gap --recipes bf16,v3_fp8,hybrid --seeds 1,2,3 \\
        -- model.size=small trainer.max_steps=300 trainer.eval_every=50
    python -m fp8train.sweep.quality --out studies/gap --report-only      # re-read, re-report

Every (recipe, seed) is one run of launch/train.py in <out>/<recipe>/seed<S>/ with
`+recipe=<recipe> trainer.seed=<S>` and the overrides after `--` (shared by all runs); the same
seed gives every recipe the same initial weights and data order. On a machine with GPUs one run
per GPU runs at a time (CUDA_VISIBLE_DEVICES), on CPU one after another (run_pool.py). Running
the same command again skips finished runs and resumes interrupted ones.

`--variant LABEL='OVERRIDES'` adds a recipe that is not a preset, e.g.
    --variant v3_current='+recipe=v3_fp8 recipe.input.scaling=current recipe.weight.scaling=current
                          recipe.grad_output.scaling=current'
(the label becomes the run's recipe.name). Any override works, e.g. '+recipe=bf16 +qat=w4_g128'.

Outputs in <out>: quality.md (table), quality.json (every number), loss_gap.png (bands), one
folder and one .log per run. The statistics (paired by seed, Student-t interval) are explained in
gap_stats.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from fp8train.numerics.recipe import list_recipes
from fp8train.sweep import gap_stats, gap_telemetry
from fp8train.sweep.gap_plot import plot_study
from fp8train.sweep.run_pool import Job, run_jobs, visible_gpus
from fp8train.sweep.runs import CompareError, load_run

STUDY_FILE = "study.json"
# A numerics study runs every eligible GEMM in FP8: the speed policy (trainer.precision_policy=table)
# keeps layers that do not pay in BF16, which on a GPU is every layer of a 125M model, and the study
# would compare BF16 with BF16 (session 7's first GPU study did: 0 of 85 layers converted). An
# override after `--` still wins (Hydra takes the last value).
JOB_DEFAULTS = ("logger.progress_bar=false", "trainer.precision_policy=off")


def parse_variant(text: str) -> tuple[str, list[str]]:
    """'LABEL=override override ...' -> (label, overrides + recipe.name=LABEL)."""
    label, sep, overrides = text.partition("=")
    if not sep or not label or not overrides.strip():
        raise ValueError(f"--variant {text!r}: write LABEL='OVERRIDES', e.g. "
                         f"v3_current='+recipe=v3_fp8 recipe.input.scaling=current'")
    items = overrides.split()
    if any(o.startswith("+recipe=") for o in items):
        items.append(f"recipe.name={label}")
    return label, items


def plan(out: Path, recipes: dict[str, list[str]], seeds: list[int], common: list[str]) -> list[Job]:
    """Seed-major order: every recipe of seed 1, then of seed 2, ...; a study cut short by its
    deadline leaves complete pairs (what the paired statistics use)."""
    return [Job(label, seed, [*JOB_DEFAULTS, *overrides, f"trainer.seed={seed}", *common],
                out / label / f"seed{seed}")
            for seed in seeds for label, overrides in recipes.items()]


def _final_val(job: Job) -> tuple[float | None, dict[int, float], int | None]:
    """(final validation loss or None, {step: val loss}, FP8 layers or None) of one run folder."""
    if not (job.run_dir / "metrics.jsonl").is_file():
        return None, {}, None
    try:
        run = load_run(job.run_dir)
    except CompareError:
        return None, {}, None
    curve = dict(zip(run.val_steps, run.val_loss))
    path = job.run_dir / "summary.json"
    summary = json.loads(path.read_text()) if path.is_file() else {}
    final = summary.get("final_val_loss")
    return (float(final) if final is not None and job.finished() else None), curve, summary.get("fp8_layers")


def analyse(jobs: list[Job], baseline: str, confidence: float) -> dict:
    """Per recipe: final val loss spread, paired gap to the baseline, curves (for the plot)."""
    finals: dict[str, dict[int, float]] = {}
    curves: dict[str, dict[int, dict[int, float]]] = {}
    fp8_layers: dict[str, set[int]] = {}
    for job in jobs:
        final, curve, layers = _final_val(job)
        finals.setdefault(job.label, {})
        if final is not None:
            finals[job.label][job.seed] = final
            curves.setdefault(job.label, {})[job.seed] = curve
            if layers is not None:
                fp8_layers.setdefault(job.label, set()).add(layers)
    if not finals.get(baseline):
        raise CompareError(f"no finished {baseline!r} run: the gap needs the baseline "
                           f"(recipes with results: {sorted(k for k, v in finals.items() if v)})")
    rows = {}
    for label, losses in finals.items():
        row: dict = {"seeds": sorted(losses), "final_val_loss": losses,
                     "fp8_layers": sorted(fp8_layers.get(label, ()))}  # [] when the runs predate the count
        if losses:
            row["spread"] = asdict(gap_stats.spread(list(losses.values())))
            if label != baseline:
                row["gap"] = asdict(gap_stats.paired_gap(label, losses, finals[baseline], confidence))
        rows[label] = row
    base = gap_stats.spread(list(finals[baseline].values()))
    base_sd_pct = None if base.sd is None else 100.0 * base.sd / base.mean
    return {"baseline": baseline, "confidence": confidence, "baseline_seed_sd_pct": base_sd_pct,
            "recipes": rows, "curves": curves}


def _fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def markdown(result: dict, header: str) -> str:
    base, pct = result["baseline"], int(round(result["confidence"] * 100))
    lines = [f"# Loss-gap study {header}", "",
             f"Gap = 100 * (val loss - {base} val loss) / {base} val loss, paired by seed; "
             f"interval: two-sided {pct}% Student-t over the per-seed gaps (n - 1 dof). "
             f"{base} seed-to-seed sd of the final val loss: "
             f"{_fmt(result['baseline_seed_sd_pct'], '.3f')}%.", "",
             f"| recipe | runs | final val loss (mean +- sd) | gap to {base} (%) | {pct}% CI (%) "
             "| resolved from 0 | per-seed gaps (%) | FP8 layers |", "|---|---|---|---|---|---|---|---|"]
    no_fp8 = []
    for label, row in result["recipes"].items():
        spread, gap = row.get("spread"), row.get("gap")
        loss = "no finished run" if spread is None else str(gap_stats.Spread(**spread))
        if gap is None:
            cells = ["(baseline)" if label == base else "n/a", "", "", ""]
        else:
            ci = (f"[{gap['ci_low']:+.3f}, {gap['ci_high']:+.3f}]" if gap["ci_low"] is not None
                  else "n/a (1 seed)")
            resolved = gap["ci_low"] is not None and (gap["ci_low"] > 0 or gap["ci_high"] < 0)
            cells = [f"{gap['mean']:+.3f}", ci, "yes" if resolved else "no",
                     ", ".join(f"{g:+.2f}" for g in gap["per_seed"])]
        layers = row.get("fp8_layers", [])
        cells.append("/".join(map(str, layers)) if layers else "n/a")
        if label != base and layers == [0]:
            no_fp8.append(label)
        lines.append(f"| {label} | {len(row['seeds'])} | {loss} | " + " | ".join(cells) + " |")
    if no_fp8:
        lines += ["", f"**Warning: {', '.join(no_fp8)} ran no FP8 layer** (every GEMM in high precision, so the "
                      "gap is BF16 vs BF16). The study turns the speed policy off by default "
                      "(trainer.precision_policy=off); an override after `--` turned it back on."]
    return "\n".join(lines) + "\n"


def report(out: Path, jobs: list[Job], baseline: str, confidence: float, header: str) -> dict:
    result = analyse(jobs, baseline, confidence)
    telemetry = gap_telemetry.study_telemetry(jobs)
    result["telemetry"] = telemetry
    (out / "quality.md").write_text(markdown(result, header) + gap_telemetry.markdown(
        telemetry, gap_telemetry.preset_formats(telemetry), 1 / 3))
    plot_study(result["curves"], baseline, out / "loss_gap.png", confidence)
    jsonable = {**result, "curves": {k: {str(s): {str(t): v for t, v in c.items()} for s, c in by.items()}
                                     for k, by in result["curves"].items()}}
    (out / "quality.json").write_text(json.dumps(jsonable, indent=1))
    return result


def run_slots(gpus: str, parallel: int) -> list[str | None]:
    """GPU ids to pin runs to, or `parallel` CPU slots when there is no GPU (or --gpus none)."""
    if parallel < 1:
        raise ValueError(f"--parallel {parallel} must be >= 1")
    if gpus == "none":
        return [None] * parallel
    ids = visible_gpus() if gpus == "auto" else [g for g in gpus.split(",") if g]
    return list(ids) if ids else [None] * parallel


def _recipes(args) -> dict[str, list[str]]:
    names = [name for name in args.recipes.split(",") if name]
    unknown = sorted(set(names) - set(list_recipes()))
    if unknown:
        raise ValueError(f"--recipes: no preset {unknown} in recipes/; available: {list_recipes()} "
                         f"(use --variant LABEL='OVERRIDES' for a recipe that is not a preset)")
    recipes = {name: [f"+recipe={name}"] for name in names}
    for text in args.variant:
        label, overrides = parse_variant(text)
        if label in recipes:
            raise ValueError(f"--variant label {label!r} is used twice (or is also in --recipes)")
        recipes[label] = overrides
    if args.baseline not in recipes:
        raise ValueError(f"--baseline {args.baseline!r} is not among the recipes {sorted(recipes)}; "
                         f"add it to --recipes")
    return recipes


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fp8train.sweep.quality", description=__doc__.split("\n")[0],
                                epilog="Overrides after `--` go to every run (e.g. -- model.size=small "
                                       "trainer.max_steps=300).")
    p.add_argument("--out", type=Path, required=True, help="study folder (created; reused to resume)")
    p.add_argument("--recipes", default="bf16,v3_fp8", help="comma-separated presets from recipes/")
    p.add_argument("--variant", action="append", default=[], help="LABEL='OVERRIDES' (repeatable)")
    p.add_argument("--seeds", default="1,2,3", help="comma-separated trainer.seed values")
    p.add_argument("--baseline", default="bf16")
    p.add_argument("--gpus", default="auto", help="auto | none | comma-separated CUDA ids")
    p.add_argument("--parallel", type=int, default=1, help="concurrent runs on CPU (default 1)")
    p.add_argument("--confidence", type=float, default=0.95)
    p.add_argument("--deadline-s", type=float, default=None,
                   help="start no run after S seconds and stop running ones (they checkpoint); "
                        "call again to continue")
    p.add_argument("--report-only", action="store_true", help="analyse <out> as planned before")
    p.add_argument("--dry-run", action="store_true", help="print the planned commands, run nothing")
    return p


def _load_or_plan(args, common: list[str]) -> tuple[list[Job], dict]:
    study_file = args.out / STUDY_FILE
    if args.report_only:
        if not study_file.is_file():
            raise ValueError(f"--report-only: {study_file} does not exist; run the study first")
        study = json.loads(study_file.read_text())
    else:
        seeds = [int(s) for s in args.seeds.split(",") if s]
        if not seeds:
            raise ValueError(f"--seeds {args.seeds!r}: give at least one seed, e.g. 1,2,3")
        study = {"recipes": _recipes(args), "seeds": seeds, "common": common, "baseline": args.baseline}
    jobs = plan(args.out, study["recipes"], study["seeds"], study["common"])
    return jobs, study


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    common = argv[argv.index("--") + 1:] if "--" in argv else []
    args = _parser().parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    try:
        jobs, study = _load_or_plan(args, common)
        if args.dry_run:
            print("\n".join(" ".join(job.command()) for job in jobs))
            return 0
        if not args.report_only:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / STUDY_FILE).write_text(json.dumps(study, indent=1))
            run_jobs(jobs, run_slots(args.gpus, args.parallel), deadline_s=args.deadline_s)
        header = f"{args.out} (seeds {study['seeds']}; overrides: {' '.join(study['common']) or 'none'})"
        report(args.out, jobs, study["baseline"], args.confidence, header)
    except (ValueError, CompareError) as error:
        print(f"quality: error: {error}", file=sys.stderr)
        return 2
    print((args.out / "quality.md").read_text())
    print(f"wrote {args.out / 'quality.md'}, {args.out / 'quality.json'}, {args.out / 'loss_gap.png'}")
    left = [j for j in jobs if not j.finished()]
    if left and not args.dry_run:
        print(f"quality: {len(left)} run(s) not finished yet; run the same command again to continue")
    failed = [j for j in jobs if j.returncode not in (0, None) and not (j.run_dir / "summary.json").is_file()]
    for job in failed:
        print(f"quality: run {job.label} seed {job.seed} failed (exit {job.returncode}): {job.log_path}",
              file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
