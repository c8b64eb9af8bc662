"""Where a ZeRO-3 step's time goes, BF16 vs FP8: one process per run, the real trainer, one GPU.

    python benchmarks/zero3_profile.py --out /tmp/z3prof                       # 1b: bf16/hybrid x ZeRO-3/1
    python benchmarks/zero3_profile.py --size tiny --runs bf16:3 hybrid:3 --extra trainer.device=cpu data.seq_len=32

Issue 18: on an H200 (1B model, eager, 2 micro-batches per step) hybrid FP8 saved ~50 ms per step
under ZeRO-1/2 and COST ~85 ms under ZeRO-3. Each run (`recipe:zero_stage`) builds the trainer as
launch/train.py would (benchmarks/bench_e2e.py's config: the experiment's micro-batch and global
batch, the shipped precision policy, eager), runs --warmup steps, times --steps steps, then
profiles one more step (torch.profiler, CPU + CUDA) and reports per optimizer step:

    step_ms         median wall time of a timed step
    gpu_busy_ms     union of the GPU's kernel/copy intervals in the profiled step: the GPU work;
                    step_ms well above it means the GPU waited for the host (a host-bound step)
    syncs / sync_ms host calls that block on the GPU (cuda*Synchronize, as the profiler lists
                    them) and the host time spent in them
    fetches         DeepSpeed ZeRO-3 module parameter fetches (fetch_sub_module calls)
    casts/layer     FP8 weight casts per FP8 layer (min-max over layers): 1 = once per step
    host_ms         the profiled step's CPU time in torch operators (self time, summed)

and, per run, the top operators by self CPU time. Nothing is asserted; a table is printed and the
rows (with the top-operator lists) are written to <out>/zero3_profile.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.bench_e2e import compose  # noqa: E402
from benchmarks.common import device_name, gpu_busy_ns, print_table  # noqa: E402

COLUMNS = ["run", "fp8_layers", "step_ms", "gpu_busy_ms", "syncs", "sync_ms", "fetches", "casts/layer", "host_ms"]


def _count_fetches() -> list[int]:
    """Count DeepSpeed's ZeRO-3 parameter fetches (one per module forward/backward that needs them)."""
    from deepspeed.runtime.zero import partitioned_param_coordinator as coordinator  # noqa: PLC0415

    cls, calls = coordinator.PartitionedParameterCoordinator, [0]
    original = cls.fetch_sub_module

    def counting(self, *args, **kwargs):
        calls[0] += 1
        return original(self, *args, **kwargs)

    cls.fetch_sub_module = counting
    return calls


def _busy_ms(prof) -> float | None:
    busy = gpu_busy_ns(prof)
    return busy / 1e6 if busy else None


def profile_step(trainer) -> dict:
    from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415

    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        trainer._timed_step()
        if cuda:
            torch.cuda.synchronize()
    events = prof.key_averages()
    syncs = [e for e in events if "Synchronize" in e.key]
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:15]
    return {"gpu_busy_ms": _busy_ms(prof) if cuda else None,
            "syncs": sum(e.count for e in syncs), "sync_ms": sum(e.cpu_time_total for e in syncs) / 1e3,
            "host_ms": sum(e.self_cpu_time_total for e in events if not e.key.startswith("cuda")) / 1e3,
            "top_ops": [(e.key, e.count, round(e.self_cpu_time_total / 1e3, 3)) for e in top]}


def measure(run: str, args) -> dict:
    from fp8train.numerics import FP8Linear  # noqa: PLC0415
    from fp8train.train.config import resolve  # noqa: PLC0415
    from fp8train.train.trainer import Trainer  # noqa: PLC0415

    recipe, _, stage = run.partition(":")
    logging.getLogger("fp8train").setLevel(logging.WARNING)
    fetches = _count_fetches()
    extra = ["trainer.compile=false", f"deepspeed.zero_stage={stage}", *args.extra]
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(resolve(compose(args.size, recipe, args.warmup + args.steps + 1, "table", extra), Path(tmp)))
        layers = [m for m in trainer.model.modules() if isinstance(m, FP8Linear)]
        for _ in range(args.warmup):
            trainer._timed_step()
        times = []
        for _ in range(args.steps):
            started = time.perf_counter()
            trainer._timed_step()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times.append(time.perf_counter() - started)
        casts, fetches[0] = [layer.weight_casts for layer in layers], 0
        row = profile_step(trainer)
        casts = [layer.weight_casts - c for layer, c in zip(layers, casts)]
        trainer.close()
    return {"run": run, "fp8_layers": len(layers), "step_ms": statistics.median(times) * 1e3, "fetches": fetches[0],
            "casts/layer": f"{min(casts)}-{max(casts)}" if casts else "-", **row}


def run_isolated(run: str, args) -> dict:
    cmd = [sys.executable, __file__, "--one", run, "--size", args.size, "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--extra", *args.extra]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    lines = result.stdout.strip().splitlines()
    if result.returncode or not lines:
        return {"run": run, "error": (result.stdout + result.stderr)[-3000:]}
    return json.loads(lines[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", default=["bf16:3", "hybrid:3", "bf16:1", "hybrid:1"],
                        help="recipe:zero_stage, each in its own process")
    parser.add_argument("--size", default="1b", help="model size (1b, 125m: the gpu experiments; tiny: CPU)")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per run (median reported)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--extra", nargs="*", default=[], help="more Hydra overrides for every run")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for run in [args.one] if args.one else args.runs:
        recipe, sep, stage = run.partition(":")
        if not sep or stage not in ("0", "1", "2", "3"):
            raise SystemExit(f"--runs {run!r}: expected recipe:zero_stage, e.g. hybrid:3")
    if args.one:
        print(json.dumps(measure(args.one, args)))
        return 0
    rows = []
    for run in args.runs:
        rows.append(run_isolated(run, args))
        print(f"{run}: " + (rows[-1].get("error") or f"{rows[-1]['step_ms']:.1f} ms"), flush=True)
    good = [r for r in rows if "error" not in r]
    print(f"\nper optimizer step, {args.size} model on {device_name()}, torch {torch.__version__} (one process per run):")
    print_table([{k: (f"{r[k]:.1f}" if isinstance(r.get(k), float) else r.get(k, "-")) for k in COLUMNS} for r in good],
                COLUMNS)
    for r in good:
        print(f"\n{r['run']}: top operators by self CPU time (ms) in the profiled step")
        print_table([{"op": k[:70], "calls": c, "self_cpu_ms": ms} for k, c, ms in r["top_ops"]],
                    ["op", "calls", "self_cpu_ms"])
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "zero3_profile.json").write_text(json.dumps(rows, indent=1))
    return 1 if len(good) < len(rows) else 0


if __name__ == "__main__":
    sys.exit(main())
