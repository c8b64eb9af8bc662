"""The fault-injection campaign: break training runs and checkpoint writes on purpose, then check that
nothing already saved was lost, that the resumed run matches the uninterrupted one bit for bit, and
that the error named the problem. CPU only; prints one table row per trial.

    python scripts/fault_injection.py --trials 50 --seed 0              # the full campaign
    python scripts/fault_injection.py --trials 20 --kinds checkpoint_kill
    python scripts/fault_injection.py --kinds rank_death,disk_full --workdir /tmp/faults
    python scripts/fault_injection.py --results benchmarks/results/fault_campaign_cpu

Besides the table it writes <results>/fault_campaign.json (command, machine, trials and ok per
kind, every row) and <results>/fault_campaign.md (the table); --results defaults to the workdir.

Kinds (tests/train/fault_checkpoint.py and tests/train/fault_launch.py say what each checks):

    checkpoint_kill  forked checkpoint writer (real Checkpointer, no DeepSpeed), kill -9 at random
                     moments, 3 rounds per trial: sub-second trials, so most of the budget
    train_kill       kill -9 of a training launch at a random step and offset
    sigterm          SIGTERM at a random moment (preemption)
    disk_full        run folder on a small tmpfs (RLIMIT_FSIZE where mounting is impossible)
    data_changed     train.bin rewritten under the running job
    rank_death       kill -9 of rank 1 of a 2-process torchrun (gloo) job

--trials is the total: every launch kind gets max(1, trials // 25) trials (2 each for 50), the
rest go to checkpoint_kill. Launch trials take seconds to a minute each on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.train import fault_checkpoint, fault_launch  # noqa: E402

LAUNCH_KINDS = ("train_kill", "sigterm", "disk_full", "data_changed", "rank_death")
KINDS = ("checkpoint_kill", *LAUNCH_KINDS)


def plan(trials: int, kinds: list[str]) -> dict[str, int]:
    launch = [k for k in kinds if k in LAUNCH_KINDS]
    each = max(1, trials // 25)
    counts = {k: each for k in launch}
    if "checkpoint_kill" in kinds:
        counts["checkpoint_kill"] = max(1, trials - each * len(launch))
    return counts


def run_trial(kind: str, seed: int, workdir: Path, refs: dict) -> dict:
    if kind == "checkpoint_kill":
        return {"kind": kind, "seed": seed, **fault_checkpoint.trial(workdir / f"ckpt_{seed}", seed)}
    dataset = fault_launch.small_dataset(workdir / "dataset")
    nproc = 2 if kind == "rank_death" else 1
    if nproc not in refs:
        refs[nproc] = fault_launch.reference(workdir, dataset, nproc)
    return getattr(fault_launch, kind)(workdir, dataset, seed, refs[nproc])


def table(rows: list[dict]) -> str:
    columns = ("#", "kind", "seed", "fault / kill points", "resumed from", "outcome", "s")
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for i, row in enumerate(rows, 1):
        fault = row.get("fault") or row.get("killed_in", "")
        lines.append(f"| {i} | {row['kind']} | {row['seed']} | {fault} | {row.get('resumed_from', '')} "
                     f"| {row['outcome'][:160]} | {row['seconds']:.1f} |")
    return "\n".join(lines)


def by_kind(rows: list[dict]) -> dict[str, dict]:
    counts: dict[str, dict] = {}
    for row in rows:
        entry = counts.setdefault(row["kind"], {"trials": 0, "ok": 0, "failed": 0})
        entry["trials"] += 1
        entry["ok" if row["outcome"].startswith("ok") else "failed"] += 1
    return counts


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    for line in cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def write_results(folder: Path, argv: list[str], rows: list[dict], seconds: float) -> None:
    """fault_campaign.json (machine-readable) and fault_campaign.md (the table) in `folder`."""
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    record = {
        "command": " ".join(["python scripts/fault_injection.py", *argv]),
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(),
                    "python": platform.python_version(), "torch": torch.__version__},
        "seconds": round(seconds, 1), "trials": len(rows),
        "ok": sum(r["outcome"].startswith("ok") for r in rows), "by_kind": by_kind(rows),
        "rows": [{**r, "seconds": round(r["seconds"], 1)} for r in rows],
    }
    (folder / "fault_campaign.json").write_text(json.dumps(record, indent=1) + "\n")
    (folder / "fault_campaign.md").write_text(table(rows) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated subset of {KINDS}")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a new temporary folder")
    parser.add_argument("--results", type=Path, default=None,
                        help="where fault_campaign.json/.md go (default: the workdir)")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    kinds = [k for k in args.kinds.split(",") if k]
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        parser.error(f"--kinds: unknown {unknown}; allowed: {', '.join(KINDS)}")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="fp8train_faults_"))
    workdir.mkdir(parents=True, exist_ok=True)
    rows, refs, begun = [], {}, time.time()
    for kind, count in plan(args.trials, kinds).items():
        for index in range(count):
            started = time.time()
            row = run_trial(kind, args.seed * 1000 + index, workdir, refs)
            rows.append({**row, "seconds": time.time() - started})
            print(f"[{len(rows)}] {kind} seed {row['seed']}: {row['outcome'][:200]}", flush=True)
    print(table(rows))
    for kind, count in by_kind(rows).items():
        print(f"  {kind:<16} {count['trials']:>3} trials, {count['ok']:>3} ok, {count['failed']} failed")
    write_results(args.results or workdir, argv, rows, time.time() - begun)
    failed = sum(not r["outcome"].startswith("ok") for r in rows)
    print(f"\n{len(rows)} trials, {len(rows) - failed} ok, {failed} failed; work folder {workdir}; "
          f"results in {args.results or workdir}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
