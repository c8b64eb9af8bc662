"""Per-layer FP8 health of finished runs: SQNR, saturation and underflow of every cast, measured
on sampled validation micro-batches with the runs' own final weights and FP8 state.

    python -m fp8train.sweep.fp8_probe runs/a runs/b [--batches 2] [--out probe.json]

Each run is rebuilt as it trained (its recipe, its amax histories and scales, any FP8 health
guard promotions: run_model.load_run_model(fp8=True)); forward + backward run on `--batches`
validation micro-batches with FP8 telemetry on (numerics.telemetry: saturated, underflow,
sqnr_db per layer and role; no optimizer step). Per run and role the table shows the worst layer
and the median over layers; --out writes every layer's numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from fp8train import data as fp8data
from fp8train import numerics
from fp8train.numerics.health_guard import parse_telemetry
from fp8train.sweep.run_model import dataset_dir, load_run_model

ROLES = ("input", "weight", "grad_output")


def probe_run(run_dir: Path, batches: int) -> dict[str, dict[str, dict[str, float]]]:
    """{layer: {role: {stat: mean over the sampled micro-batches}}}."""
    model, cfg = load_run_model(run_dir, fp8=True)
    model.train()
    val = fp8data.ValBatches(fp8data.TokenFile(dataset_dir(cfg), "val"), cfg["data"]["seq_len"],
                             cfg["trainer"]["micro_batch_size"], max_batches=batches)
    sums: dict[tuple[str, str, str], list[float]] = {}
    numerics.set_fp8_telemetry(model, True)
    for input_ids, labels in val:
        model(input_ids, labels).backward()
        model.zero_grad(set_to_none=True)
        for layer, roles in parse_telemetry(numerics.fp8_telemetry(model)).items():
            for role, stats in roles.items():
                for stat, value in stats.items():
                    sums.setdefault((layer, role, stat), []).append(value)
    out: dict = {}
    for (layer, role, stat), values in sums.items():
        out.setdefault(layer, {}).setdefault(role, {})[stat] = sum(values) / len(values)
    return out


def role_summary(layers: dict) -> dict[str, dict[str, float]]:
    """Per role: worst and median layer SQNR, largest saturated and underflow fractions."""
    out = {}
    for role in ROLES:
        rows = [roles[role] for roles in layers.values() if role in roles]
        if not rows:
            continue
        sqnr = [r["sqnr_db"] for r in rows if "sqnr_db" in r]
        out[role] = {"min_sqnr_db": min(sqnr) if sqnr else float("nan"),
                     "median_sqnr_db": statistics.median(sqnr) if sqnr else float("nan"),
                     "max_saturated": max(r.get("saturated", 0.0) for r in rows),
                     "max_underflow": max(r.get("underflow", 0.0) for r in rows)}
    return out


def markdown(summaries: dict[str, dict]) -> str:
    lines = ["| run | role | SQNR dB worst layer | SQNR dB median | saturated max | underflow max |",
             "|---|---|---|---|---|---|"]
    for run, roles in summaries.items():
        for role, s in roles.items():
            lines.append(f"| {run} | {role} | {s['min_sqnr_db']:.1f} | {s['median_sqnr_db']:.1f} | "
                         f"{s['max_saturated']:.2e} | {s['max_underflow']:.2e} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fp8train.sweep.fp8_probe", description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="run folders (with checkpoints/latest)")
    p.add_argument("--batches", type=int, default=2, help="validation micro-batches to sample")
    p.add_argument("--out", type=Path, default=None, help="write every layer's numbers here (JSON)")
    args = p.parse_args(argv)
    layers, summaries = {}, {}
    try:
        for run in args.runs:
            layers[str(run)] = probe_run(run, args.batches)
            summaries[str(run)] = role_summary(layers[str(run)])
    except ValueError as error:
        print(f"fp8_probe: error: {error}", file=sys.stderr)
        return 2
    print(markdown(summaries))
    if args.out is not None:
        args.out.write_text(json.dumps({"summary": summaries, "layers": layers}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
