"""Weak scaling over GPUs through the real trainer: tokens/s per GPU, efficiency, memory, amax sync.

    python benchmarks/bench_scaling.py --budget --out /tmp/scaling     # ~8 min on 4 H100s
    python benchmarks/bench_scaling.py --full --models 1b --zero 1     # part of the issue's matrix
    python benchmarks/bench_scaling.py --models 1b --recipes bf16,blockwise --zero 2 --worlds 1,4
    python benchmarks/bench_scaling.py --budget --dry-run              # print the commands only
    python benchmarks/bench_scaling.py --preset cpu                    # the driver on a CPU (gloo)

Every matrix point is one `torchrun --standalone --nproc_per_node=N` of the trainer
(benchmarks/scaling_worker.py = launch/train.py + an amax all-reduce timer, no final checkpoint)
with a model from scaling_presets.yaml, a recipe and a ZeRO stage. Weak scaling: the per-GPU
batch (micro x accum) stays fixed, so the global batch grows with the GPUs. From each run's
metrics.jsonl, the steps from `timed_from` on (after warm-up) give the steady-state step time and
tokens/s; summary.json gives the peak memory (largest rank); the worker's timings give the FP8
amax all-reduce per step (median over steps, slowest rank) and how many collectives it issued.

Table columns: tokens/s per GPU; efficiency = tokens/s per GPU at N / at 1 GPU (same model,
recipe and stage; "z1" marks a ZeRO-1 one-GPU baseline where the stage has none); FP8 speedup =
tokens/s / BF16's at the same GPUs and stage; FP8 layers = the layers the run converted (the
speed policy may keep some, or all, in BF16: the count says what a row measured). The parity check
runs one model at a FIXED global batch on 1, 2, 4 GPUs and prints the largest relative train-loss
difference against 1 GPU. Parity is about FP8 state across ranks (amax all-reduce, scales, weight
caches), so its runs switch the speed policy off (PARITY_OVERRIDES): every eligible layer in FP8.
Never asserts on time; writes scaling.json and scaling.md to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "benchmarks" / "scaling_worker.py"
PRESETS = REPO / "benchmarks" / "scaling_presets.yaml"
RUN_TIMEOUT_S = 300
COMMON = ("logger.mode=disabled", "logger.progress_bar=false", "trainer.save_every=1000000",
          "trainer.fp8_telemetry_every=0")
# The default speed policy keeps a small model's layers in BF16 on an H100/H200 (0 FP8 layers at
# 125M): a parity run must put them in FP8, or it compares BF16 with BF16 (sessions 6-7 did).
PARITY_OVERRIDES = ("trainer.precision_policy=off",)


@dataclass(frozen=True)
class Point:
    model: str
    recipe: str
    zero: int
    world: int
    global_batch: int  # sequences per optimizer step, all GPUs
    steps: int
    kind: str = "scaling"  # scaling | parity
    overrides: tuple[str, ...] = ()  # extra Hydra overrides of this point

    @property
    def name(self) -> str:
        return f"{self.kind}_{self.model}_{self.recipe}_z{self.zero}_{self.world}gpu"


def load_presets() -> dict:
    return yaml.safe_load(PRESETS.read_text())


def scaling_points(preset: dict, models: dict, args) -> list[Point]:
    """The preset's points, or the matrix given on the command line (which wins)."""
    custom = any(getattr(args, k) for k in ("models", "recipes", "zero", "worlds"))
    matrix = preset.get("matrix") if "points" not in preset or custom else None
    if custom:
        matrix = dict(matrix or {"models": ["1b"], "recipes": ["bf16", "hybrid"], "zero": [1],
                                 "worlds": [1, 2, 4]})
        for key in ("models", "recipes", "zero", "worlds"):
            if getattr(args, key):
                matrix[key] = [int(v) if key in ("zero", "worlds") else v for v in getattr(args, key).split(",")]
    rows = preset["points"] if matrix is None else [
        [m, r, z, w] for m in matrix["models"] for z in matrix["zero"] for w in matrix["worlds"]
        for r in matrix["recipes"]]
    points = []
    for model, recipe, zero, world in rows:
        if model not in models:
            raise SystemExit(f"model {model!r} is not in {PRESETS.name}; choose from {sorted(models)}")
        per_gpu = models[model]["micro"] * models[model]["accum"]
        points.append(Point(model, recipe, int(zero), int(world), per_gpu * int(world), args.steps))
    return sorted(points, key=lambda p: (p.world != 1, p.world == 2)) if matrix else points


def parity_points(spec: dict, steps: int) -> list[Point]:
    overrides = PARITY_OVERRIDES + tuple(spec.get("overrides", ()))
    return [Point(spec["model"], spec["recipe"], 1, w, spec["global_batch"], steps, "parity", overrides)
            for w in spec["worlds"]]


def command(point: Point, models: dict, run_dir: Path, compile_model: bool, extra: list[str]) -> list[str]:
    model = models[point.model]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={point.world}",
            str(WORKER), *model["overrides"], f"+recipe={point.recipe}", f"deepspeed.zero_stage={point.zero}",
            f"trainer.micro_batch_size={model['micro']}", f"trainer.global_batch_size={point.global_batch}",
            f"trainer.max_steps={point.steps}", f"trainer.eval_every={point.steps}",
            f"trainer.compile={str(compile_model).lower()}", *COMMON, *point.overrides, *extra,
            f"hydra.run.dir={run_dir}"]


@dataclass
class Job:
    cmd: list[str]
    run_dir: Path
    proc: subprocess.Popen
    started: float


def start_run(cmd: list[str], run_dir: Path, devices: str | None = None) -> Job:
    """Start one training job in its own process group (on `devices` when given)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                             "MASTER_ADDR", "MASTER_PORT")}
    # torchrun would give each rank ONE CPU thread (OMP_NUM_THREADS=1 when N > 1): a fair share of
    # the cores instead, so building the 1B model on the CPU does not dominate a 4-GPU run.
    world = int(cmd[cmd.index("--standalone") + 1].split("=")[1])
    threads = max(1, min(16, (os.cpu_count() or 1) // world))
    env.update(PYTHONUNBUFFERED="1", WANDB_MODE="disabled", OMP_NUM_THREADS=str(threads))
    if devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = devices
    with open(run_dir / "console.log", "w") as console:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=console, stderr=subprocess.STDOUT,
                                start_new_session=True)
    return Job(cmd, run_dir, proc, time.perf_counter())


def finish_run(job: Job) -> tuple[int, float]:
    """Wait (killing the whole group after RUN_TIMEOUT_S); (exit code, seconds)."""
    cmd, run_dir, proc, started = job.cmd, job.run_dir, job.proc, job.started
    try:
        rc = proc.wait(timeout=max(1.0, RUN_TIMEOUT_S - (time.perf_counter() - started)))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        rc = proc.wait()
    seconds = time.perf_counter() - started
    (run_dir / "bench_run.json").write_text(json.dumps({"rc": rc, "seconds": seconds, "cmd": cmd}))
    return rc, seconds


def previous_run(run_dir: Path) -> tuple[int, float] | None:
    """(exit code, seconds) of a finished run in run_dir, for --report-only."""
    path = run_dir / "bench_run.json"
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    return record["rc"], record["seconds"]


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.is_file() else []


def amax_sync(run_dir: Path, timed_from: int) -> tuple[float | None, int | None]:
    """(median ms per step on the slowest rank, collectives per call) from the worker's files.

    (None, None): the bank was never asked (no delayed scaling, e.g. bf16 or blockwise);
    (None, 0): it was asked but issued no collective (one rank, or the all-reduce moved)."""
    medians, collectives, calls = [], {0}, 0
    for path in sorted(run_dir.glob("amax_allreduce.rank*.json")):
        record = json.loads(path.read_text())
        timed = [(ms, c) for step, (ms, c) in enumerate(zip(record["ms"], record["collectives"]), 1)
                 if step >= timed_from]
        calls += len(timed)
        if with_collective := [ms for ms, c in timed if c > 0]:
            medians.append(statistics.median(with_collective))
            collectives.update(c for _, c in timed)
    if not calls:
        return None, None
    return (max(medians) if medians else None), max(collectives)


def analyse(point: Point, run_dir: Path, timed_from: int, rc: int, seconds: float) -> dict:
    row = {**asdict(point), "name": point.name, "rc": rc, "wall_s": round(seconds, 1)}
    records = [r for r in read_metrics(run_dir) if r["step"] >= timed_from]
    summary_path = run_dir / "summary.json"
    if rc != 0 or not records or not summary_path.is_file():
        return {**row, "error": f"exit {rc}; see {run_dir / 'console.log'}"}
    summary = json.loads(summary_path.read_text())
    tokens_per_step = records[-1]["tokens"] // records[-1]["step"]
    step_s = [tokens_per_step / r["train/tokens_per_s"] for r in records]
    tokens_per_s = tokens_per_step * len(step_s) / sum(step_s)
    amax_ms, collectives = amax_sync(run_dir, timed_from)
    step_ms = statistics.median(step_s) * 1e3
    return {**row, "device": summary["device"], "timed_steps": len(step_s), "step_ms": step_ms,
            "tokens_per_s": tokens_per_s, "tokens_per_s_per_gpu": tokens_per_s / point.world,
            "peak_gib": summary["peak_memory_gib"], "amax_ms": amax_ms, "amax_collectives": collectives,
            "amax_pct": None if amax_ms is None else 100 * amax_ms / step_ms,
            "final_train_loss": summary["final_train_loss"], "fp8_layers": summary.get("fp8_layers")}


def fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def scaling_table(rows: list[dict]) -> str:
    ok = {(r["model"], r["recipe"], r["zero"], r["world"]): r for r in rows if "error" not in r}
    lines = ["| model | recipe | ZeRO | GPUs | tokens/s/GPU | efficiency | peak GiB/GPU | step ms | "
             "amax all-reduce ms (colls) | % of step | FP8 speedup | FP8 layers |", "|" + "---|" * 12]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['recipe']} | {r['zero']} | {r['world']} | failed: {r['error']} |")
            continue
        key = (r["model"], r["recipe"])
        base, mark = ok.get((*key, r["zero"], 1)), ""
        if base is None and (base := ok.get((*key, 1, 1))) is not None:
            mark = " (z1)"
        eff = fmt(r["tokens_per_s_per_gpu"] / base["tokens_per_s_per_gpu"], ".3f") + mark if base else "-"
        bf16 = ok.get((r["model"], "bf16", r["zero"], r["world"]))
        speedup = fmt(r["tokens_per_s"] / bf16["tokens_per_s"], ".2f") + "x" if bf16 else "-"
        amax = ("-" if r["amax_collectives"] is None else "no collective" if r["amax_ms"] is None
                else f"{r['amax_ms']:.3f} ({r['amax_collectives']})")
        lines.append(f"| {r['model']} | {r['recipe']} | {r['zero']} | {r['world']} | "
                     f"{r['tokens_per_s_per_gpu']:,.0f} | {eff} | {r['peak_gib']:.2f} | {r['step_ms']:.1f} | "
                     f"{amax} | {fmt(r['amax_pct'], '.3f')} | {speedup} | {fmt(r.get('fp8_layers'), 'd')} |")
    return "\n".join(lines)


def parity_table(rows: list[dict], run_dirs: dict[str, Path]) -> str:
    ok = [r for r in rows if "error" not in r]
    if not ok or ok[0]["world"] != 1:
        return "parity: no 1-GPU reference run finished"
    curves = {r["world"]: {m["step"]: m["train/loss"] for m in read_metrics(run_dirs[r["name"]])} for r in ok}
    ref = curves[1]
    lines = [f"Loss parity, {ok[0]['model']} {ok[0]['recipe']}, global batch {ok[0]['global_batch']} "
             f"sequences on every world size:", "",
             "| GPUs | step-1 loss | max relative difference vs 1 GPU (step) | final train loss | FP8 layers |",
             "|---|---|---|---|---|"]
    layers = {r["world"]: r.get("fp8_layers") for r in ok}
    for world, curve in curves.items():
        common = sorted(set(curve) & set(ref))
        rel = [(abs(curve[s] - ref[s]) / abs(ref[s]), s) for s in common]
        worst, at = max(rel) if rel else (float("nan"), 0)
        diff = "reference" if world == 1 else f"{worst:.2e} ({at})"
        lines.append(f"| {world} | {curve.get(1, float('nan')):.7f} | {diff} | "
                     f"{curve[max(curve)]:.5f} | {fmt(layers[world], 'd')} |")
    if ok[0]["recipe"] != "bf16" and not any(layers.values()):
        lines += ["", f"WARNING: recipe {ok[0]['recipe']} converted no layer to FP8: this parity check "
                  "compared BF16 with BF16"]
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default=None, help="a preset of scaling_presets.yaml (budget, full, cpu)")
    p.add_argument("--budget", action="store_const", const="budget", dest="preset_flag")
    p.add_argument("--full", action="store_const", const="full", dest="preset_flag")
    p.add_argument("--models"), p.add_argument("--recipes"), p.add_argument("--zero"), p.add_argument("--worlds")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--timed-from", type=int, default=None, help="first step counted as steady state")
    p.add_argument("--compile", choices=["true", "false"], default=None)
    p.add_argument("--no-parity", action="store_true")
    p.add_argument("--parity-only", action="store_true")
    p.add_argument("--deadline-s", type=float, default=None, help="start no new run after this many seconds")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "bench_scaling")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    p.add_argument("--report-only", action="store_true", help="tabulate the runs already in --out")
    p.add_argument("extra", nargs="*", help="more Hydra overrides for every run (after --)")
    return p.parse_args(argv)


def waves(points: list[Point], parity: list[Point], at: int, gpus: int | None) -> list[list[Point]]:
    """Runs in order, one per wave; parity runs (not timed) share a wave while their GPUs fit."""
    plan = [[p] for p in points[:at]]
    for point in parity:
        last = plan[-1] if plan and plan[-1][0].kind == "parity" else None
        if gpus and last and sum(p.world for p in last) + point.world <= gpus:
            last.append(point)
        else:
            plan.append([point])
    return plan + [[p] for p in points[at:]]


def main(argv=None) -> int:
    args = parse_args(argv)
    presets = load_presets()
    name = args.preset or args.preset_flag or "budget"
    if name not in presets["presets"]:
        raise SystemExit(f"--preset {name!r}: choose one of {sorted(presets['presets'])}")
    preset, models = presets["presets"][name], presets["models"]
    args.steps = args.steps or preset["steps"]
    timed_from = args.timed_from or preset["timed_from"]
    compile_model = (args.compile or str(preset["compile"]).lower()) == "true"
    points = [] if args.parity_only else scaling_points(preset, models, args)
    parity = [] if args.no_parity else parity_points(preset["parity"], preset["parity"]["steps"])
    gpus = None if args.dry_run or args.report_only else _gpus_or_cpu_ranks()
    started, results, run_dirs = time.perf_counter(), [], {}
    for wave in waves(points, parity, preset.get("parity_after", len(points)), gpus):
        todo = []
        for point in wave:
            run_dir = args.out / "runs" / point.name
            cmd = command(point, models, run_dir, compile_model, args.extra)
            skip = _skip_reason(point, gpus, started, args.deadline_s)
            if args.dry_run:
                print(" ".join(cmd))
            elif args.report_only and (done := previous_run(run_dir)) is not None:
                results.append(analyse(point, run_dir, _timed(point, timed_from), *done))
                run_dirs[point.name] = run_dir
            elif not args.report_only and skip:
                print(f"skip {point.name}: {skip}", flush=True)
            elif not args.report_only:
                todo.append((point, run_dir, cmd))
        results += _run_wave(todo, len(todo) > 1, timed_from, run_dirs)
        if todo:  # tables on disk after every wave: a call cut short still returns them
            report(args.out, results, run_dirs, name, compile_model, timed_from, quiet=True)
    if args.dry_run:
        return 0
    return report(args.out, results, run_dirs, name, compile_model, timed_from)


def _timed(point: Point, timed_from: int) -> int:
    """Scaling runs are timed from the steady state on; parity compares every step."""
    return timed_from if point.kind == "scaling" else 1


def _skip_reason(point: Point, gpus: int | None, started: float, deadline_s: float | None) -> str:
    if gpus is not None and point.world > gpus:
        return f"{point.world} GPUs asked, {gpus} present"
    if deadline_s and time.perf_counter() - started > deadline_s:
        return f"past --deadline-s {deadline_s:.0f}"
    return ""


def _run_wave(todo: list, split_gpus: bool, timed_from: int, run_dirs: dict) -> list[dict]:
    """Start every run of the wave (on disjoint GPUs when several), wait, analyse."""
    procs, first = [], 0
    for point, run_dir, cmd in todo:
        devices = ",".join(str(first + i) for i in range(point.world)) if split_gpus else None
        first += point.world
        procs.append((point, run_dir, start_run(cmd, run_dir, devices)))
    rows = []
    for point, run_dir, proc in procs:
        rc, seconds = finish_run(proc)
        run_dirs[point.name] = run_dir
        row = analyse(point, run_dir, _timed(point, timed_from), rc, seconds)
        rows.append(row)
        print(f"{point.name}: {seconds:.0f} s, " + (row.get("error") or
              f"{row['tokens_per_s_per_gpu']:,.0f} tokens/s/GPU, step {row['step_ms']:.1f} ms"), flush=True)
    return rows


def _gpus_or_cpu_ranks() -> int | None:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else None


def report(out: Path, results: list[dict], run_dirs: dict, preset: str, compile_model: bool,
           timed_from: int, quiet: bool = False) -> int:
    rows = [r for r in results if r["kind"] == "scaling"]
    parity_rows = [r for r in results if r["kind"] == "parity"]
    device = next((r["device"] for r in results if "device" in r), "?")
    head = (f"Weak scaling on {device} (preset {preset}; torch.compile {'on' if compile_model else 'off'}; "
            f"steady state from step {timed_from})")
    text = "\n\n".join(t for t in (head, scaling_table(rows) if rows else "",
                                   parity_table(parity_rows, run_dirs) if parity_rows else "") if t)
    if not quiet:
        print("\n" + text, flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "scaling.md").write_text(text + "\n")
    (out / "scaling.json").write_text(json.dumps({"scaling": rows, "parity": parity_rows}, indent=1))
    return 1 if any("error" in r for r in results) else 0

if __name__ == "__main__":
    sys.exit(main())
