"""Issue 15's PTQ quality table: a launch/quantize.py report checked against the issue's goals.

    python benchmarks/ptq_trained_table.py --report quantized/x/report.json --size 125m \\
        [--train-summary runs/<id>/summary.json] [--out-md table.md] [--out-json table.json]

The report holds one row per method: `baseline` (the unquantized model: its FP32 master weights),
every preset (e.g. `rtn_w4_g128`) and, with a greedy plan, `<preset> + plan`. Per row this adds

    change     100 (ppl / ppl_baseline - 1), in %
    recovered  the share of RTN-W4's gap a 4-bit method wins back (rows of 4 to 5 average bits):
               (ppl_rtn_w4 - ppl) / (ppl_rtn_w4 - ppl_baseline); the GPTQ paper's OPT-125M anchor
               is 64% (RTN 37.28, GPTQ 31.12, FP16 27.65)
    goal, met  the issue's goal for that method and model size (benchmarks/ptq_goals.yaml: data, not
               code) and whether this run meets it: met, NOT met, or n/a when a row it refers to
               was not run

and prints one Markdown table; presets the report lists as skipped (its deadline) are named under it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fp8train.ptq.report import relative_rows  # noqa: E402

GOALS = Path(__file__).with_name("ptq_goals.yaml")
GOAL_KINDS = ("max_change_pct", "min_recovered_pct", "within_pct_of", "better_than", "max_avg_bits")
PLAN_SUFFIX = " + plan"   # how launch/quantize.py labels the row of a mixed-precision plan
MIXED = "mixed_plan"      # its key in the goals file


def load_goals(size: str, path: Path = GOALS) -> dict[str, dict]:
    """The goals of one model size, every goal kind checked against GOAL_KINDS."""
    table = yaml.safe_load(Path(path).read_text())
    if size not in table:
        raise ValueError(f"--size {size!r}: no goals for it in {path}; available: {sorted(table)}")
    for method, goal in table[size].items():
        unknown = sorted(set(goal) - set(GOAL_KINDS))
        if unknown:
            raise ValueError(f"{path}: {size}.{method} has unknown goal kinds {unknown}; allowed: {list(GOAL_KINDS)}")
    return table[size]


def recovered_pct(row: dict, rtn_w4: dict | None, base_ppl: float) -> float | None:
    """% of RTN-W4's perplexity gap a 4-bit row (4..5 average bits, not RTN-W4 itself) wins back."""
    if rtn_w4 is None or row["method"] == rtn_w4["method"] or not 4.0 <= row.get("avg_bits", 0) <= 5.0:
        return None
    gap = rtn_w4["ppl"] - base_ppl
    return 100.0 * (rtn_w4["ppl"] - row["ppl"]) / gap if gap > 0 else None


def check_goal(goal: dict, row: dict, change: float, recovered: float | None,
               by_name: dict[str, dict]) -> tuple[str, bool | None]:
    """(the goal in words, met?): None when a row the goal needs is missing."""
    parts, verdicts = [], []
    if "max_change_pct" in goal:
        parts.append(f"<= {goal['max_change_pct']:g}%")
        verdicts.append(change <= goal["max_change_pct"])
    if "min_recovered_pct" in goal:
        parts.append(f"recovers >= {goal['min_recovered_pct']:g}% of RTN-W4's gap")
        verdicts.append(None if recovered is None else recovered >= goal["min_recovered_pct"])
    if "within_pct_of" in goal:
        other, pct = goal["within_pct_of"]
        parts.append(f"ppl within {pct:g}% of {other}")
        ref = by_name.get(other)
        verdicts.append(None if ref is None else row["ppl"] <= (1 + pct / 100) * ref["ppl"])
    if "better_than" in goal:
        other = goal["better_than"]
        if other == "uniform":
            other = row["method"].removesuffix(PLAN_SUFFIX)
        parts.append(f"ppl < {other}")
        ref = by_name.get(other)
        verdicts.append(None if ref is None else row["ppl"] < ref["ppl"])
    if "max_avg_bits" in goal:
        parts.append(f"<= {goal['max_avg_bits']:g} avg bits")
        verdicts.append(row.get("avg_bits", float("inf")) <= goal["max_avg_bits"])
    met = False if False in verdicts else None if None in verdicts else True
    return ", ".join(parts), met


def assess(rows: list[dict], goals: dict[str, dict], rtn_w4: str = "rtn_w4_g128") -> list[dict]:
    """The report's rows with change_pct, recovered_pct, goal and met added."""
    by_name = {r["method"]: r for r in rows}
    if "baseline" not in by_name:
        raise ValueError(f"the report has no 'baseline' row (rows: {sorted(by_name)}); run launch/quantize.py")
    base = by_name["baseline"]["ppl"]
    out = []
    for row in relative_rows(rows):  # the report's own change column (delta_pct)
        change = row["delta_pct"]
        recovered = recovered_pct(row, by_name.get(rtn_w4), base)
        goal = goals.get(MIXED if row["method"].endswith(PLAN_SUFFIX) else row["method"])
        text, met = check_goal(goal, row, change, recovered, by_name) if goal else ("", None)
        out.append({**row, "change_pct": change, "recovered_pct": recovered, "goal": text, "met": met})
    return out


def missing_goals(rows: list[dict], goals: dict[str, dict]) -> list[str]:
    """Goals of the size that no row of the report answers (their preset was not asked for)."""
    keys = {MIXED if r["method"].endswith(PLAN_SUFFIX) else r["method"] for r in rows}
    return [name for name in goals if name not in keys]


def gap_note(rows: list[dict], rtn_w4: str) -> str:
    """Why the recovery column is empty when RTN-W4 costs nothing (or is missing)."""
    row = next((r for r in rows if r["method"] == rtn_w4), None)
    if row is None:
        return f"No {rtn_w4} row: the RTN-W4 gap (and the goals that need it) cannot be computed."
    if row["change_pct"] <= 0:
        return (f"{rtn_w4} is not worse than the unquantized model here ({row['change_pct']:+.3f}%): "
                f"there is no gap to recover, so the recovery goals read n/a.")
    return ""


def markdown(rows: list[dict], size: str, skipped: list[str] = (), header: str = "",
             missing: list[str] = (), notes: list[str] = ()) -> str:
    """One table; presets not run (skipped, or goals without a row) named under it."""
    verdict = {True: "met", False: "**NOT met**", None: "n/a"}
    lines = [f"## PTQ quality vs issue 15's {size} goals", ""] + ([header, ""] if header else [])
    lines += [f"| method | avg bits | ppl | change | RTN-W4 gap recovered | goal ({size}) | met |",
              "|---|---|---|---|---|---|---|"]
    for r in rows:
        base = r["method"] == "baseline"
        change = "" if base else f"{r['change_pct']:+.3f}%"
        recovered = "" if r["recovered_pct"] is None else f"{r['recovered_pct']:.0f}%"
        met = verdict[r["met"]] if r["goal"] else ""
        name = "unquantized (FP32 master weights)" if base else r["method"]
        lines.append(f"| {name} | {r.get('avg_bits', 0):.2f} | {r['ppl']:.4f} | {change} | {recovered} "
                     f"| {r['goal']} | {met} |")
    if skipped:
        lines += ["", f"Not run (the quantize deadline passed first): {', '.join(skipped)}"]
    missing = [name for name in missing if name not in skipped]
    if missing:
        lines += ["", f"Goals without a row (not in this report): {', '.join(missing)}"]
    lines += [line for note in notes if note for line in ("", note)]
    return "\n".join(lines) + "\n"


def train_header(summary_path: Path | None) -> str:
    if summary_path is None or not summary_path.is_file():
        return ""
    s = json.loads(summary_path.read_text())
    return (f"Model: {s.get('model_size')} ({s.get('parameters', 0) / 1e6:.1f}M parameters), recipe "
            f"{s.get('recipe')}, {s.get('steps')} steps ({s.get('tokens_seen', 0) / 1e6:.1f}M tokens) on "
            f"{s.get('device')}; final val loss {s.get('final_val_loss') or float('nan'):.4f} "
            f"(unigram entropy {s.get('unigram_entropy') or float('nan'):.3f}).")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--report", type=Path, required=True, help="report.json written by launch/quantize.py")
    p.add_argument("--size", default="125m", help="which goals of benchmarks/ptq_goals.yaml")
    p.add_argument("--rtn-w4", default="rtn_w4_g128", help="the RTN-W4 row whose gap GPTQ/AWQ recover")
    p.add_argument("--train-summary", type=Path, default=None, help="the trained run's summary.json")
    p.add_argument("--out-md", type=Path, default=None)
    p.add_argument("--out-json", type=Path, default=None)
    args = p.parse_args(argv)
    if not args.report.is_file():
        raise SystemExit(f"--report {args.report} does not exist (launch/quantize.py writes <output>/report.json)")
    report = json.loads(args.report.read_text())
    goals = load_goals(args.size)
    rows = assess(report["rows"], goals, args.rtn_w4)
    text = markdown(rows, args.size, report.get("skipped") or [], train_header(args.train_summary),
                    missing_goals(rows, goals), [gap_note(rows, args.rtn_w4)])
    extra = f"Eval: {report.get('eval_windows')} val windows x {report.get('eval_seq_len')} tokens; " \
            f"calibration {report.get('calibration')}.\n"
    text += "\n" + extra
    print(text)
    if args.out_md:
        args.out_md.write_text(text)
    if args.out_json:
        args.out_json.write_text(json.dumps({"size": args.size, "rows": rows, "skipped": report.get("skipped") or [],
                                             "report": str(args.report)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
