"""End to end: model size x recipe through the real trainer, BF16 in the same run, one GPU.

    python benchmarks/bench_e2e.py --sizes 1b 125m 350m --recipes bf16 hybrid current blockwise \
        --steps 12 --profile-steps 3 --policy calibrate --out "$OUT/e2e" --budget-s 420
    python benchmarks/bench_e2e.py --runs 1b:bf16 1b:hybrid 125m:bf16 125m:hybrid 125m:hybrid:off ...

Each (size, recipe) builds the trainer in this process from the Hydra config the user would run
(`+experiment=gpu_<size> +recipe=<recipe>`, compiled per decoder block, the precision policy as
given), runs `--steps` optimizer steps and reads the trainer's summary: steady-state tokens/s (the
first step, which compiles, and any step that compiled are excluded; fp8train/train/throughput.py;
the table compares the median steady step, and shows the steady mean beside it),
MFU (against the BF16 dense peak), peak GiB (torch.cuda.max_memory_allocated, reset per run, minus
what was still allocated when the run started). Then `--profile-steps` more steps run under
torch.profiler (CUDA activity only): GPU busy = the union of the kernel and memcpy intervals / the
wall time of those steps, and <run>/kernels.txt gets the kernels by GPU time. No evaluation, no
checkpoints.

Runs go in the order given (sizes outer, recipes inner, or `--runs size:recipe[:policy]` in that
order); the ratio column divides by the BF16 run of the same size. `--isolate` starts every run in
a fresh Python process, as a user's training run is: measured on an H200, a BF16 run that followed
FP8 runs in one process was 11% slower than the BF16 run that preceded them (and a tiny model's
eager step 39% slower), with the same kernels (benchmarks/results/h200_session5). `--repeats N`
runs the whole plan N times, every other pass in reverse order, and reports the median per row with
the spread (max/min - 1). A run that would start after `--budget-s` is skipped and listed, so a
time-limited call still prints a table. Each run's row is written to <out>/<size>_<recipe>.json as
soon as it finishes; `--report-only` prints the table of every row file in --out (several
invocations, e.g. one process per model size so that nothing one run leaves behind can reach the
next size, share one table). `--extra` adds Hydra overrides (the CPU test runs the tiny model this
way). Never asserts on time.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import device_name, gpu_busy_ns, print_table, write_json  # noqa: E402
from benchmarks.kernel_breakdown import table as kernel_table  # noqa: E402
from fp8train.train.throughput import compared_rate  # noqa: E402

EXPERIMENTS = {"125m": "gpu_125m", "350m": "gpu_350m", "1b": "gpu_1b"}
POLICIES = ("off", "table", "calibrate")
COLUMNS = ["size", "recipe", "tokens_per_s", "vs_bf16", "mean_tokens_per_s", "mfu", "peak_gib", "gpu_busy",
           "fp8_layers", "wall_tokens_per_s", "compile_s", "status"]


def compose(size: str, recipe: str, steps: int, policy: str, extra: list[str]):
    """The run's config as `launch/train.py +experiment=... +recipe=...` would build it."""
    from hydra import compose as hydra_compose, initialize_config_dir  # noqa: PLC0415

    from fp8train.numerics.recipe import RECIPES_DIR  # noqa: PLC0415
    from fp8train.train.run_id import register_run_id_resolver  # noqa: PLC0415
    from fp8train.train.schema import register_recipes, register_schema  # noqa: PLC0415

    register_schema()
    register_recipes(RECIPES_DIR)
    register_run_id_resolver()
    size_override = [f"+experiment={EXPERIMENTS[size]}"] if size in EXPERIMENTS else [f"model.size={size}"]
    overrides = [*size_override, f"+recipe={recipe}", "logger.mode=disabled", "logger.progress_bar=false",
                 f"trainer.max_steps={steps + 1000}", "trainer.eval_every=1000000", "trainer.save_every=1000000",
                 "trainer.fp8_telemetry_every=0", "trainer.resume=none", f"trainer.precision_policy={policy}",
                 *extra]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides)


def gpu_busy_fraction(run, steps: int, kernels_file: Path | None = None) -> float | None:
    """Union of GPU activity intervals / wall time over `steps` calls of run() (None on CPU)."""
    if steps < 1 or not torch.cuda.is_available():
        return None
    from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        started = time.perf_counter_ns()
        for _ in range(steps):
            run()
        torch.cuda.synchronize()
        wall = time.perf_counter_ns() - started
    if kernels_file is not None:
        kernels_file.write_text(prof.key_averages().table(sort_by="self_device_time_total", row_limit=150))
    return gpu_busy_ns(prof) / wall if wall > 0 else None


def idle_report(run, steps: int, idle_file: Path) -> str | None:
    """`steps` more calls of run() profiled with host activity too (which slows the host, so the
    busy fraction comes from the CUDA-only pass): where the GPU waited (benchmarks/idle_gaps.py)."""
    if steps < 1 or not torch.cuda.is_available():
        return None
    from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415

    from benchmarks.idle_gaps import from_profile, report as idle_table  # noqa: PLC0415

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            run()
        torch.cuda.synchronize()
    text = idle_table(*from_profile(prof))
    idle_file.write_text(text + "\n")
    return text


def run_one(size: str, recipe: str, policy: str, args, out: Path) -> dict:
    from fp8train.train.config import resolve  # noqa: PLC0415
    from fp8train.train.trainer import Trainer  # noqa: PLC0415

    run_dir = out / run_name(size, recipe, policy, args.policy)
    run_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(run_dir / "train.log")
    logging.getLogger("fp8train").addHandler(handler)
    logging.getLogger("fp8train").setLevel(logging.INFO)
    torch._dynamo.reset()
    leftover = 0
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        leftover = torch.cuda.memory_allocated()
        if leftover > 2**30:
            print(f"warning: {leftover / 2**30:.1f} GiB still allocated from earlier runs", flush=True)
    trainer = None
    try:
        trainer = Trainer(resolve(compose(size, recipe, args.steps, policy, args.extra), run_dir))
        for _ in range(args.steps):
            trainer._timed_step()
        busy = gpu_busy_fraction(trainer._optimizer_step, args.profile_steps, run_dir / "kernels.txt")
        try:  # a diagnostic: its failure must not cost the row
            idle = idle_report(trainer._optimizer_step, args.idle_steps, run_dir / "idle.txt")
        except Exception as error:  # noqa: BLE001
            idle = f"idle-gap report failed: {type(error).__name__}: {error}"
        if idle:
            print(f"{size} {recipe} ({policy}): {idle}", flush=True)
        summary = trainer._summarize(preempted=False)
        if torch.cuda.is_available():
            summary["peak_memory_gib"] = (torch.cuda.max_memory_allocated() - leftover) / 2**30
            summary["leftover_gib_at_start"] = leftover / 2**30
        report = trainer.conversion_report
        return {"size": size, "recipe": recipe, "policy": policy, "summary": summary, "gpu_busy": busy,
                "fp8_layers": len(report.converted),
                "eligible_layers": len(report.converted) + sum(why.startswith("bf16:") for _, why in report.skipped),
                "policy_report": [n for n in report.notes if n.startswith("precision policy")], "status": "ok"}
    finally:
        if trainer is not None:
            trainer.close()
        logging.getLogger("fp8train").removeHandler(handler)
        handler.close()
        del trainer
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def run_name(size: str, recipe: str, policy: str, default_policy: str) -> str:
    return f"{size}_{recipe}" + (f"_policy_{policy}" if policy != default_policy else "")


def plan(args) -> list[tuple[str, str, str]]:
    """[(size, recipe, policy)] in run order."""
    if not args.runs:
        return [(size, recipe, args.policy) for size in args.sizes for recipe in args.recipes]
    runs = []
    for spec in args.runs:
        parts = spec.split(":")
        if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] not in POLICIES):
            raise SystemExit(f"--runs {spec!r}: expected size:recipe or size:recipe:policy with policy in {POLICIES}")
        runs.append((parts[0], parts[1], parts[2] if len(parts) == 3 else args.policy))
    return runs


def rate(result: dict) -> float:
    """The compared figure of a row: tokens/s of the median steady step (throughput.py)."""
    return compared_rate(result["summary"])


def table_row(result: dict, bf16: dict | None) -> dict:
    recipe = result["recipe"] + (f" ({result['policy']})" if result.get("policy_note") else "")
    if result["status"] != "ok":
        return {"size": result["size"], "recipe": recipe, "status": result["status"]}
    s = result["summary"]
    tps = rate(result)
    base = rate(bf16) if bf16 and bf16["status"] == "ok" else None
    layers = "-" if result["recipe"] == "bf16" else f"{result['fp8_layers']}/{result['eligible_layers']}"
    return {"size": result["size"], "recipe": recipe, "tokens_per_s": f"{tps:,.0f}",
            "vs_bf16": f"{tps / base:.2f}x" if base else "-",
            "mean_tokens_per_s": f"{(s.get('tokens_per_s') or 0):,.0f}",
            "mfu": f"{s['mfu']:.1%}" if s.get("mfu") is not None else "-",
            "peak_gib": f"{s['peak_memory_gib']:.2f}",
            "gpu_busy": f"{result['gpu_busy']:.0%}" if result["gpu_busy"] is not None else "-",
            "fp8_layers": layers, "wall_tokens_per_s": f"{(s.get('tokens_per_s_wall') or 0):,.0f}",
            "compile_s": f"{s.get('compile_seconds', 0):.0f}", "status": "ok"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["1b", "125m", "350m"])
    parser.add_argument("--recipes", nargs="+", default=["bf16", "hybrid", "current", "blockwise"])
    parser.add_argument("--steps", type=int, default=12, help="timed optimizer steps (the first is warm-up)")
    parser.add_argument("--profile-steps", type=int, default=3)
    parser.add_argument("--idle-steps", type=int, default=0,
                        help="steps profiled with host activity: <run>/idle.txt says where the GPU waited")
    parser.add_argument("--policy", default="table", choices=POLICIES)
    parser.add_argument("--runs", nargs="*", default=[], help="size:recipe[:policy] ... instead of sizes x recipes")
    parser.add_argument("--budget-s", type=float, default=None, help="skip runs that would start after this")
    parser.add_argument("--extra", nargs="*", default=[], help="more Hydra overrides for every run")
    parser.add_argument("--out", default="benchmarks/results/e2e")
    parser.add_argument("--report-only", action="store_true", help="only the table of the rows in --out")
    parser.add_argument("--isolate", action="store_true", help="every run in a fresh process")
    parser.add_argument("--repeats", type=int, default=1, help="passes over the plan (medians reported)")
    parser.add_argument("--tag", default="", help=argparse.SUPPRESS)  # a repeat's suffix (set by --isolate)
    args = parser.parse_args(argv)
    out, started, results = Path(args.out), time.perf_counter(), []
    if args.report_only:
        rows = [json.loads(p.read_text()) for p in out.glob("*.json") if p.name != "bench_e2e.json"]
        return report(sorted(rows, key=lambda r: r.get("finished", 0)), out)
    print(f"device: {device_name()}; torch {torch.__version__}; policy {args.policy}", flush=True)
    if args.isolate or args.repeats > 1:
        return run_isolated(args, out)
    for size, recipe, policy in plan(args):
        note = policy != args.policy
        if args.budget_s is not None and time.perf_counter() - started > args.budget_s:
            skipped = {"size": size, "recipe": recipe, "policy": policy, "policy_note": note,
                       "status": "skipped: time budget", "finished": time.time()}
            results.append(skipped)
            write_json(str(out / f"{run_name(size, recipe, policy, args.policy)}.json"), skipped)
            continue
        t0 = time.perf_counter()
        try:
            result = run_one(size, recipe, policy, args, out)
        except Exception as error:  # one failing run must not lose the table
            traceback.print_exc()
            result = {"size": size, "recipe": recipe, "policy": policy,
                      "status": f"error: {type(error).__name__}: {str(error)[:80]}"}
        result["seconds"], result["policy_note"] = round(time.perf_counter() - t0, 1), note
        result["finished"] = time.time()
        results.append(result)
        result["repeat"] = args.tag
        write_json(str(out / f"{run_name(size, recipe, policy, args.policy)}{args.tag}.json"), result)
        print(f"{size} {recipe} ({policy}): {result['status']} in {result['seconds']} s "
              f"{json.dumps(table_row(result, None))}", flush=True)
    return report(results, out)


def run_isolated(args, out: Path) -> int:
    """Every (size, recipe, policy) of the plan in its own process, --repeats passes (odd passes
    reversed); a run past --budget-s is skipped, a crashed run becomes an error row."""
    child = ["--out", str(out), "--steps", str(args.steps), "--profile-steps", str(args.profile_steps),
             "--idle-steps", str(args.idle_steps),
             "--policy", args.policy, "--extra", *args.extra]  # one run each: --runs and --tag below
    started, results = time.perf_counter(), []
    runs = plan(args)
    for rep in range(args.repeats):
        tag = f"_r{rep + 1}" if args.repeats > 1 else ""
        for size, recipe, policy in (runs if rep % 2 == 0 else runs[::-1]):
            name = run_name(size, recipe, policy, args.policy) + tag
            note = policy != args.policy
            if args.budget_s is not None and time.perf_counter() - started > args.budget_s:
                result = {"size": size, "recipe": recipe, "policy": policy, "policy_note": note,
                          "status": "skipped: time budget", "finished": time.time(), "repeat": tag}
                write_json(str(out / f"{name}.json"), result)
                results.append(result)
                continue
            cmd = [sys.executable, str(Path(__file__).resolve()), *child, "--runs", f"{size}:{recipe}:{policy}",
                   "--tag", tag]
            path = out / f"{name}.json"
            path.unlink(missing_ok=True)  # a crashed run must not report an older run's row
            rc = subprocess.run(cmd, check=False).returncode
            result = json.loads(path.read_text()) if path.is_file() else {
                "size": size, "recipe": recipe, "policy": policy, "status": f"error: process exit {rc}"}
            result["policy_note"], result["repeat"] = note, tag
            results.append(result)
    return report(results, out)


def median_rows(results: list[dict]) -> list[dict]:
    """One result per (size, recipe, policy): the median-throughput repeat, with the spread."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["size"], r["recipe"], r["policy"]), []).append(r)
    merged = []
    for group in groups.values():
        ok = sorted((r for r in group if r["status"] == "ok"), key=rate)
        if not ok:
            merged.append(group[0])
            continue
        pick = dict(ok[(len(ok) - 1) // 2])
        rates = [rate(r) for r in ok]
        pick["runs"], pick["spread"] = len(ok), (max(rates) / min(rates) - 1) if min(rates) > 0 else None
        merged.append(pick)
    return merged


def report(results: list[dict], out: Path) -> int:
    rows = []
    all_results, results = results, median_rows(results)
    for r in results:
        bf16 = next((b for b in results if b["size"] == r["size"] and b["recipe"] == "bf16"
                     and b["status"] == "ok"), None)
        row = table_row(r, bf16)
        if r.get("runs", 1) > 1:
            row["runs"], row["spread"] = r["runs"], f"{r['spread']:.1%}"
        rows.append(row)
    print(f"\nend to end on {device_name()} (tokens/s of the median steady step; BF16 of the same size in the same run):")
    text = print_table(rows, COLUMNS + (["runs", "spread"] if any("runs" in row for row in rows) else []))
    print("\nprecision policy per size (from the conversion report):")
    for r in results:
        for line in r.get("policy_report", []):
            print(f"  {r['size']} {r['recipe']} ({r['policy']}): {line}")
    kernels = sorted(out.glob("*/kernels.txt"))
    if kernels:  # where each run's GPU time went, slice by slice (benchmarks/kernel_breakdown.py)
        print("\nGPU ms per kind of kernel over the profiled steps:\n" + kernel_table(kernels))
    write_json(str(out / "bench_e2e.json"), {"device": device_name(), "torch": str(torch.__version__),
                                             "rows": rows, "runs": all_results})
    (out / "bench_e2e.txt").write_text(text + "\n")
    return 0 if all(r["status"] == "ok" or r["status"].startswith("skipped") for r in all_results) else 1


if __name__ == "__main__":
    sys.exit(main())
