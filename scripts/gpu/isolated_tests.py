"""Run GPU test files (or test functions) in separate pytest processes, spread over the GPUs.

A kernel fault (illegal instruction, illegal address) poisons its process's CUDA context and
fails every later test of that process; one process per unit keeps a fault to its own tests.
A unit is a file, or `file::function` for the files named with --split.

    python scripts/gpu/isolated_tests.py tests/gpu tests/kernels/test_kv_kernels.py \
        --split tests/gpu/test_grouped_fp8_kernels.py --out $OUT/tests
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
import time
from pathlib import Path

from gpu_pool import run_on_gpus  # scripts/gpu/, this script's folder


def units(paths: list[str], split: set[str]) -> list[str]:
    files: list[Path] = []
    for p in map(Path, paths):
        files += sorted(p.glob("test_*.py")) if p.is_dir() else [p]
    out = []
    for f in files:
        if str(f) in split:
            tree = ast.parse(f.read_text())
            out += [f"{f}::{n.name}" for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")]
        else:
            out.append(str(f))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+")
    parser.add_argument("--split", nargs="*", default=[])
    parser.add_argument("--gpus", type=int, default=None)
    parser.add_argument("--timeout", type=float, default=240)
    parser.add_argument("--out", type=Path, default=Path("/tmp/isolated_tests"))
    args = parser.parse_args()
    import torch

    gpus = args.gpus or max(1, torch.cuda.device_count())
    t_start = time.time()
    rows = []
    for run in run_on_gpus(units(args.paths, set(args.split)),
                           lambda unit: [sys.executable, "-m", "pytest", "-q", "-rs", "-s", "-p", "no:cacheprovider", unit],
                           gpus, args.timeout, args.out):
        text = run.text
        summary = next((ln for ln in reversed(text.splitlines()) if re.search(r"\d+ (passed|failed|error|skipped)", ln)), "")
        fault = "illegal" if re.search(r"illegal (instruction|memory)", text) else ""
        result = "TIMEOUT" if run.returncode is None else ("ok" if run.returncode == 0 else f"rc {run.returncode}")
        rows.append((run.job, result, summary.strip("= "), fault, run.seconds, run.log))
    print("| unit | result | pytest summary | fault | s |\n|---|---|---|---|---|")
    for unit, result, summary, fault, seconds, _ in rows:
        print(f"| {unit} | {result} | {summary} | {fault} | {seconds:.0f} |")
    bad = [r for r in rows if r[1] != "ok"]
    print(f"{len(rows) - len(bad)}/{len(rows)} units passed in {time.time() - t_start:.0f} s on {gpus} GPU(s)")
    for unit, *_, log in bad:  # the failures' details, briefly
        lines = [ln for ln in log.read_text().splitlines() if ln.startswith(("E ", "FAILED"))]
        print(f"--- {unit}\n" + "\n".join(lines[:12]))
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
