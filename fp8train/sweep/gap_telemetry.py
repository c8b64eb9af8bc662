"""The FP8 telemetry the study's runs logged, per recipe and operand role: where the loss gap comes from.

Every FP8 run with `trainer.fp8_telemetry_every > 0` writes, per layer and role, the cast's SQNR
(dB), saturated and underflow fractions into metrics.jsonl (`fp8/<layer>/<role>/<stat>`). This
module reads them from a study's run folders, without rebuilding any model (fp8_probe.py does that,
from checkpoints): for each (recipe, role) it averages a layer's telemetry over the logged steps of
the last part of training (`tail`, default the last third) and over seeds, then reports the median
and the worst layer.

Reading the table: SQNR is the cast's own signal-to-noise ratio; with nothing saturated or
underflowing it is fixed by the format's mantissa (E4M3 ~31 dB, E5M2 ~25 dB for Gaussian-like
data) whatever the scaling. Underflow is the fraction of nonzero elements flushed to zero, the
part of the error a finer scale (1x128 tiles) removes.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from fp8train.numerics.health_guard import parse_telemetry
from fp8train.numerics.recipe import ROLES, list_recipes, load_recipe
from fp8train.sweep.run_pool import Job

STATS = ("sqnr_db", "saturated", "underflow")


def run_telemetry(metrics: Path, tail: float) -> dict[str, dict[str, dict[str, float]]]:
    """{layer: {role: {stat: mean over the telemetry rows of the last `tail` of the run}}}."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    rows = [row for row in rows if any(key.startswith("fp8/") for key in row)]
    if not rows:
        return {}
    last_step = max(row.get("step", 0) for row in rows)
    rows = [row for row in rows if row.get("step", 0) >= (1.0 - tail) * last_step]
    sums: dict[tuple[str, str, str], list[float]] = {}
    for row in rows:
        for layer, roles in parse_telemetry(row).items():
            for role, stats in roles.items():
                for stat in STATS:
                    if stat in stats:
                        sums.setdefault((layer, role, stat), []).append(stats[stat])
    out: dict[str, dict[str, dict[str, float]]] = {}
    for (layer, role, stat), values in sums.items():
        out.setdefault(layer, {}).setdefault(role, {})[stat] = statistics.fmean(values)
    return out


def study_telemetry(jobs: list[Job], tail: float = 1 / 3) -> dict[str, dict[str, dict]]:
    """{recipe: {role: {"layers": n, "runs": n, stat: {"median": x, "worst": y, "worst_layer": name}}}}
    over finished runs.

    A layer's value is first averaged over the recipe's runs (seeds); "worst" is the lowest SQNR or
    the highest fraction over layers."""
    per_recipe: dict[str, dict[tuple[str, str, str], list[float]]] = {}
    runs: dict[str, int] = {}
    for job in jobs:
        metrics = job.run_dir / "metrics.jsonl"
        if not job.finished() or not metrics.is_file():
            continue
        telemetry = run_telemetry(metrics, tail)
        if not telemetry:
            continue
        runs[job.label] = runs.get(job.label, 0) + 1
        bucket = per_recipe.setdefault(job.label, {})
        for layer, roles in telemetry.items():
            for role, stats in roles.items():
                for stat, value in stats.items():
                    bucket.setdefault((role, stat, layer), []).append(value)
    result: dict[str, dict[str, dict]] = {}
    for label, bucket in per_recipe.items():
        for role in ROLES:
            row: dict = {"runs": runs[label]}
            for stat in STATS:
                layers = {layer: statistics.fmean(v) for (r, s, layer), v in bucket.items() if r == role and s == stat}
                if not layers:
                    continue
                row["layers"] = len(layers)
                pick = min if stat == "sqnr_db" else max
                worst_layer = pick(layers, key=layers.get)
                row[stat] = {"median": statistics.median(layers.values()), "worst": layers[worst_layer],
                             "worst_layer": worst_layer}
            if "layers" in row:
                result.setdefault(label, {})[role] = row
    return result


def preset_formats(labels) -> dict[str, dict[str, str]]:
    """{recipe: {role: "<format> <scaling>"}} for the labels that are recipe presets."""
    presets = set(list_recipes())
    recipes = {label: load_recipe(label) for label in labels if label in presets}
    return {label: {role: f"{r.role(role).format} {r.role(role).scaling}" for role in ROLES}
            for label, r in recipes.items()}


def markdown(telemetry: dict[str, dict[str, dict]], formats: dict[str, dict[str, str]], tail: float) -> str:
    """The table quality.md appends; `formats` = {recipe: {role: "e4m3 delayed", ...}} (may be empty)."""
    if not telemetry:
        return ""
    lines = ["", f"FP8 telemetry the runs logged (last {tail:.0%} of training, each layer averaged over "
             "its telemetry steps and the recipe's seeds; median and worst layer):", "",
             "| recipe | role | format, scaling | layers | SQNR dB median | SQNR dB worst | "
             "underflow median | underflow worst | worst underflow layer | saturated worst |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for label, roles in telemetry.items():
        for role, row in roles.items():
            sqnr, under, sat = row.get("sqnr_db"), row.get("underflow"), row.get("saturated")
            cells = [f"{sqnr['median']:.1f}" if sqnr else "n/a", f"{sqnr['worst']:.1f}" if sqnr else "n/a",
                     f"{under['median']:.1e}" if under else "n/a", f"{under['worst']:.1e}" if under else "n/a",
                     under["worst_layer"] if under else "n/a", f"{sat['worst']:.1e}" if sat else "n/a"]
            fmt = formats.get(label, {}).get(role, "")
            lines.append(f"| {label} | {role} | {fmt} | {row['layers']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
