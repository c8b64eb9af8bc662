"""Check and summarise the preempted-and-resumed multi-node runs of scripts/gpu/multinode.sh.

    python scripts/gpu/multinode_check.py --steps 40 --world-size 4 --preempted slurm \
        slurm=RUN_DIR torchrun=RUN_DIR

For each run folder (one per launch path) it checks what the issue asks of a preempted job: the
run was stopped mid-run by a signal (the trainer's "stopped by signal N at step S" in the log),
the next attempt resumed from exactly that checkpoint ("resumed from .../step_S at step S"), the
run then finished all --steps at the expected world size, and metrics.jsonl holds every step
once. A run not listed in --preempted must show no stop at all. The runs are then compared step
by step: they train the same model on the same global batch, so a resume that lost anything
(data position, LR schedule, optimizer or FP8 scaling state) shows up as a gap after the stop
step. Prints the log lines that show nodes, ranks, rendezvous, requeue and resume, and a table;
exits 1 if a check fails. --fp8 also requires that the runs trained FP8 layers (summary.json's
fp8_layers > 0): a resume that only carried BF16 state proves nothing about the FP8 scaling state.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

EXCERPT = re.compile(r"attempt \d+:|head |world size|checkpoint saved before preemption|requeueing|"
                     r"resumed from|stopped by signal|got SIG|training step exited|\[multinode|"
                     r"global batch|Rendezvous complete|group_rank=|group_world_size=|global_ranks=|master_addr=|"
                     r"converted \d+ layer")

TORCH_LOG_PREFIX = re.compile(r"^[IWE]\d{4} [\d:.]+ \d+ \S+\] ")  # torch's glog-style prefix


def read_metrics(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    steps = [r["step"] for r in records]
    if len(steps) != len(set(steps)):
        raise ValueError(f"{run_dir}/metrics.jsonl logs some step twice: {sorted(steps)}")
    return {r["step"]: r["train/loss"] for r in records}


def logs_text(run_dir: Path) -> str:
    """The job log (Slurm) or the launchers' logs (torchrun), else the rank-0 trainer log."""
    files = sorted(run_dir.glob("gres_check.log")) + sorted(run_dir.glob("slurm-*.out"))
    files += sorted(run_dir.glob("launcher*.log"))
    files = files or sorted(run_dir.glob("train.rank0.log"))
    return "\n".join(f.read_text(errors="replace") for f in files)


def check_run(name: str, run_dir: Path, steps: int, world_size: int, preempted: bool, fp8: bool = False
              ) -> tuple[dict, list[str]]:
    """(row for the table, failed checks) for one launch path, preempted mid-run or not."""
    text, failures = logs_text(run_dir), []
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").is_file() else {}
    stopped = [int(s) for s in re.findall(r"stopped by signal \d+ at step (\d+); checkpoint saved", text)]
    resumed = re.findall(r"resumed from \S+step_(\d+) at step (\d+)", text)
    losses = read_metrics(run_dir)
    row = {"path": name, "stop_step": max(stopped) if stopped else None,
           "resumed_at": int(resumed[-1][1]) if resumed else None, "steps": summary.get("steps"),
           "world_size": summary.get("world_size"), "final_loss": summary.get("final_train_loss"),
           "fp8_layers": summary.get("fp8_layers")}
    if fp8 and not row["fp8_layers"]:
        failures.append(f"{name}: summary.json says fp8_layers={row['fp8_layers']}: no layer trained in FP8 "
                        "(run with trainer.precision_policy=off)")
    if preempted and (row["stop_step"] is None or not 1 <= row["stop_step"] < steps):
        failures.append(f"{name}: no preemption stop before step {steps} in the logs")
    if preempted and (row["resumed_at"] is None or row["resumed_at"] != row["stop_step"]):
        failures.append(f"{name}: resumed at {row['resumed_at']}, stopped at {row['stop_step']}")
    if not preempted and (stopped or resumed):
        failures.append(f"{name}: meant to run uninterrupted, but the logs show a stop or resume")
    if row["steps"] != steps or row["world_size"] != world_size or summary.get("preempted"):
        failures.append(f"{name}: summary says steps={row['steps']} world_size={row['world_size']} "
                        f"preempted={summary.get('preempted')}; expected {steps}, {world_size}, False")
    if sorted(losses) != list(range(1, steps + 1)):
        failures.append(f"{name}: metrics.jsonl steps {sorted(losses)[:3]}..{sorted(losses)[-3:]} "
                        f"are not 1..{steps}")
    return row, failures


def compare(curves: dict[str, dict[int, float]]) -> tuple[float, int, list[int]]:
    """Largest relative loss difference between the runs over their common steps, its step, and
    the common steps."""
    names = list(curves)
    common = sorted(set.intersection(*(set(c) for c in curves.values())))
    worst, at = 0.0, 0
    for step in common:
        values = [curves[n][step] for n in names]
        rel = (max(values) - min(values)) / abs(min(values))
        if rel > worst:
            worst, at = rel, step
    return worst, at, common


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="NAME=RUN_DIR for each launch path")
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--world-size", type=int, required=True)
    parser.add_argument("--reference", type=Path, default=None,
                        help="an uninterrupted run with the same settings, compared but not checked")
    parser.add_argument("--preempted", default="", help="comma-separated NAMEs that were preempted")
    parser.add_argument("--fp8", action="store_true", help="the runs must have trained FP8 layers")
    parser.add_argument("--tolerance", type=float, default=0.02,
                        help="largest relative loss gap between the runs that passes")
    args = parser.parse_args(argv)
    runs = dict(item.split("=", 1) for item in args.runs)
    rows, failures, curves = [], [], {}
    for name, path in runs.items():
        run_dir = Path(path)
        print(f"\n== {name}: log excerpt ({run_dir})")
        lines = (TORCH_LOG_PREFIX.sub("", line) for line in logs_text(run_dir).splitlines())
        print("\n".join(line[:200] for line in lines if EXCERPT.search(line)))
        row, failed = check_run(name, run_dir, args.steps, args.world_size,
                                name in args.preempted.split(","), args.fp8)
        rows.append(row)
        failures += failed
        curves[name] = read_metrics(run_dir)
    if args.reference is not None:
        curves["reference"] = read_metrics(args.reference)
        rows.append({"path": f"reference ({args.reference.name})", "stop_step": None})
    print("\n| path | world size | stopped at | resumed at | steps | final train loss | FP8 layers |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if "steps" in r:
            print(f"| {r['path']} | {r['world_size']} | {r['stop_step']} | {r['resumed_at']} | "
                  f"{r['steps']} | {r['final_loss']} | {r['fp8_layers']} |")
    if len(curves) > 1:
        worst, at, common = compare(curves)
        stops = ", ".join(f"{r['path']} stopped at {r['stop_step']}" if r["stop_step"] else
                          f"{r['path']} uninterrupted" for r in rows)
        where = f"at step {at}" if worst else "(identical at every common step)"
        span = f"steps {common[0]}..{common[-1]}" if common else "no common steps"
        print(f"\nloss curves of {' vs '.join(curves)} ({stops}), {span}: max relative difference "
              f"{worst:.2e} {where}")
        if not common:
            failures.append("the runs share no step to compare")
        if worst > args.tolerance:
            failures.append(f"loss curves differ by {worst:.2e} > {args.tolerance} at step {at}")
    for failure in failures:
        print(f"FAILED: {failure}")
    print("multinode check:", "FAILED" if failures else "OK")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
