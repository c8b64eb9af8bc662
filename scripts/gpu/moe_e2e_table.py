"""The end-to-end table of scripts/gpu/moe.sh e2e: one row per recipe, BF16 first.

    python scripts/gpu/moe_e2e_table.py RUNS_DIR bf16 hybrid blockwise

Reads RUNS_DIR/moe_e2e_<recipe>/summary.json (tokens/s of the median steady step, peak memory,
final losses, how many layers ran FP8) and metrics.jsonl (the training loss along the way: mean of every tenth of the run,
so two curves can be compared point by point). Prints a markdown table; a missing run is a row
saying so.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from fp8train.train.throughput import compared_rate as rate  # noqa: E402


def loss_points(metrics: Path, points: int = 3) -> str:
    """Mean training loss over `points` equal spans of the run: 'a / b / c'."""
    losses = [row["train/loss"] for row in map(json.loads, metrics.read_text().splitlines()) if "train/loss" in row]
    if not losses:
        return "-"
    span = max(1, len(losses) // points)
    chunks = [losses[i:i + span] for i in range(0, span * points, span) if losses[i:i + span]]
    return " / ".join(f"{sum(c) / len(c):.3f}" for c in chunks)


def row(runs: Path, recipe: str, baseline: dict | None) -> dict:
    run = runs / f"moe_e2e_{recipe}"
    summary_file = run / "summary.json"
    if not summary_file.exists():
        return {"recipe": recipe, "tokens/s": "missing (see its log)"}
    s = json.loads(summary_file.read_text())
    speed = rate(s)
    vs = f"{speed / rate(baseline):.2f}x" if baseline and rate(baseline) else "-"
    memory = f"{s['peak_memory_gib']:.1f}" if s.get("peak_memory_gib") is not None else "-"
    val = f"{s['final_val_loss']:.3f}" if s.get("final_val_loss") is not None else "-"
    return {"recipe": recipe, "model": s.get("model_size", "-"), "tokens/s": f"{speed / 1e3:.1f}k", "vs bf16": vs, "peak GiB": memory,
            "train loss (thirds)": loss_points(run / "metrics.jsonl") if (run / "metrics.jsonl").exists() else "-",
            "val loss": val, "steps": s.get("steps"), "FP8 layers": s.get("fp8_layers", "-"),
            "device": s.get("device")}


def main(argv: list[str]) -> None:
    runs, recipes = Path(argv[0]), argv[1:]
    base_file = runs / "moe_e2e_bf16" / "summary.json"
    baseline = json.loads(base_file.read_text()) if base_file.exists() else None
    rows = [row(runs, r, baseline) for r in recipes]
    columns = ["recipe", "model", "tokens/s", "vs bf16", "peak GiB", "train loss (thirds)", "val loss", "steps", "FP8 layers",
               "device"]
    print("\nMoE model end to end, compiled (conf/experiment/gpu_moe*.yaml)\n")
    print("| " + " | ".join(columns) + " |")
    print("|" + "|".join("---" for _ in columns) + "|")
    for r in rows:
        print("| " + " | ".join(str(r.get(c, "")) for c in columns) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
