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
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


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
    args.out.mkdir(parents=True, exist_ok=True)
    pending, running, rows = units(args.paths, set(args.split)), {}, []
    t_start = time.time()
    while pending or running:
        while pending and len(running) < gpus:
            gpu = next(g for g in range(gpus) if g not in running)
            unit = pending.pop(0)
            log = args.out / (re.sub(r"[^A-Za-z0-9_.-]", "_", unit) + ".log")
            env = {**os.environ, "CUDA_VISIBLE_DEVICES": str(gpu), "PYTHONPATH": str(ROOT)}
            handle = open(log, "w")
            proc = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-rs", "-s", "-p", "no:cacheprovider", unit],
                                    cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT)
            running[gpu] = (unit, proc, time.time(), log, handle)
        for gpu, (unit, proc, t0, log, handle) in list(running.items()):
            if proc.poll() is None and time.time() - t0 < args.timeout:
                continue
            timed_out = proc.poll() is None
            if timed_out:
                proc.kill()
                proc.wait()
            handle.close()
            text = log.read_text()
            summary = next((ln for ln in reversed(text.splitlines()) if re.search(r"\d+ (passed|failed|error|skipped)", ln)), "")
            fault = "illegal" if re.search(r"illegal (instruction|memory)", text) else ""
            rows.append((unit, "TIMEOUT" if timed_out else ("ok" if proc.returncode == 0 else f"rc {proc.returncode}"),
                         summary.strip("= "), fault, time.time() - t0))
            del running[gpu]
        time.sleep(0.2)
    print("| unit | result | pytest summary | fault | s |\n|---|---|---|---|---|")
    for unit, result, summary, fault, seconds in rows:
        print(f"| {unit} | {result} | {summary} | {fault} | {seconds:.0f} |")
    bad = [r for r in rows if r[1] != "ok"]
    print(f"{len(rows) - len(bad)}/{len(rows)} units passed in {time.time() - t_start:.0f} s on {gpus} GPU(s)")
    for unit, *_ in bad:  # the failures' details, briefly
        log = args.out / (re.sub(r"[^A-Za-z0-9_.-]", "_", unit) + ".log")
        lines = [ln for ln in log.read_text().splitlines() if ln.startswith(("E ", "FAILED"))]
        print(f"--- {unit}\n" + "\n".join(lines[:12]))
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
