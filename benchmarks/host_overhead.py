"""Per-step host work of the real trainer: BF16 vs an FP8 recipe with no FP8 layer vs FP8 layers.

    python benchmarks/host_overhead.py                       # CPU, tiny 12-layer model, a few minutes
    python benchmarks/host_overhead.py --runs bf16 hybrid:none hybrid:all bf16 --steps 20
    python benchmarks/host_overhead.py --ops-only --runs bf16 hybrid:none   # op counts only (the test)

Issue #12: on the H200 a 125m run of the blockwise recipe whose precision policy left 0 of 84
layers in FP8 ran 0.86x of BF16 although its CUDA kernels were the same, kernel for kernel: the
gap was on the host. This script builds the trainer exactly as `launch/train.py` would (the Hydra
config of benchmarks/bench_e2e.py, eager, no evaluation or checkpoints) and, per run, reports

    step_ms        median wall time of one optimizer step after --warmup steps (on the CPU every
                   op is synchronous, so this is host time plus the tiny model's arithmetic)
    hooks_ms       of which the trainer's per-step bookkeeping: the step guard (begin_step,
                   before_boundary, optimizer pre-hook, after_step) and the FP8 state hooks
                   (after_optimizer_step, set_fp8_telemetry), median over the same steps
    gc_ms          time the cyclic garbage collector ran, per step
    ops/step       torch operator calls (aten, counted by a TorchDispatchMode) in one step
    hook_ops       of which inside the bookkeeping above
    fp8_hooks      calls of the FP8 hooks (after_optimizer_step, set_fp8_telemetry,
                   invalidate_weight_caches) in one step: 0 without FP8 state
    py_calls       Python function calls in one step (cProfile): the Python-side work
    objects_at_start / model_freed   gc-tracked objects when the run started, and whether its
                   model was freed after it (False: something global holds the run)

Runs are `recipe[:layers]`: `bf16`; `<recipe>:none` is the recipe with a precision policy that
keeps every layer in BF16 (a crossover table for this device that says FP8 never pays, read
through the real policy, trainer.precision_policy=table); `<recipe>:all` converts every eligible
layer (policy off). Then a cProfile diff lists what each FP8 run calls per step that the first
BF16 run does not (by extra own time), and each run's bookkeeping by cumulative time.
`--isolate` runs each in a fresh process (nothing one run leaves behind reaches the next); by
default they share one, and repeating bf16 at the end shows any carry-over. On a GPU it runs the
same way (scripts/gpu/host_overhead.sh). Prints tables, never asserts on time.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import json
import logging
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.bench_e2e import compose  # noqa: E402
from benchmarks.common import device_name, print_table  # noqa: E402

COLUMNS = ["run", "fp8_layers", "step_ms", "vs_bf16", "hooks_ms", "gc_ms", "ops/step", "hook_ops", "fp8_hooks", "py_calls",
           "objects_at_start", "model_freed"]
SMALL = ["data.seq_len=32", "trainer.micro_batch_size=2", "trainer.global_batch_size=8", "trainer.compile=false"]


class OpCounter(TorchDispatchMode):
    """Counts aten operator calls while active."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


class HookMeter:
    """Wraps the trainer's per-step bookkeeping calls; sums their time and (optionally) op counts."""

    GUARD = ("begin_step", "before_boundary", "after_step")
    NUMERICS = ("after_optimizer_step", "set_fp8_telemetry", "invalidate_weight_caches")

    def __init__(self, trainer):
        import fp8train.numerics as numerics  # noqa: PLC0415 (the trainer calls numerics.<name>)

        self.seconds, self.counter, self.hook_ops, self.profiler, self.fp8_calls = 0.0, None, 0, None, 0
        self.patched = [(numerics, name, getattr(numerics, name)) for name in self.NUMERICS]
        for name in self.GUARD:
            setattr(trainer.guard, name, self._timed(getattr(trainer.guard, name)))
        for owner, name, fn in self.patched:
            setattr(owner, name, self._timed(fn, fp8_hook=True))
        pre_hook = trainer.guard.optimizer_pre_hook  # registered on the optimizer: timed via its hooks
        for hooks in _step_pre_hooks(trainer.engine):
            for key, hook in list(hooks.items()):
                if getattr(hook, "__func__", None) is getattr(pre_hook, "__func__", pre_hook):
                    hooks[key] = self._timed(hook)

    def _timed(self, fn, fp8_hook: bool = False):
        def wrapper(*args, **kwargs):
            self.fp8_calls += fp8_hook
            before = self.counter.count if self.counter is not None else 0
            started = time.perf_counter()
            if self.profiler is not None:
                self.profiler.enable()
            try:
                return fn(*args, **kwargs)
            finally:
                if self.profiler is not None:
                    self.profiler.disable()
                self.seconds += time.perf_counter() - started
                if self.counter is not None:
                    self.hook_ops += self.counter.count - before
        wrapper.__wrapped__ = fn
        return wrapper

    def restore(self) -> None:
        """Put the module-level functions back (the next run in this process wraps them again)."""
        for owner, name, fn in self.patched:
            setattr(owner, name, fn)


def _step_pre_hooks(engine):
    optimizer = getattr(engine, "optimizer", None)
    seen = set()
    while optimizer is not None and id(optimizer) not in seen:
        seen.add(id(optimizer))
        hooks = getattr(optimizer, "_optimizer_step_pre_hooks", None)
        if isinstance(hooks, dict):
            yield hooks
        optimizer = getattr(optimizer, "optimizer", None)


def no_fp8_table(recipe_name: str):
    """A crossover table for this device saying FP8 never pays (every shape 0.5x): the real
    precision policy then keeps every layer in BF16."""
    from fp8train.numerics.crossover import parse_crossover, recipe_class  # noqa: PLC0415
    from fp8train.numerics.recipe import load_recipe  # noqa: PLC0415

    klass = recipe_class(load_recipe(recipe_name))
    name = device_name()
    return parse_crossover({"device": name, "match": name, "source": "benchmarks/host_overhead.py (FP8 never pays)",
                            "classes": {klass: [{"tokens": 1, "in": 1, "out": 1, "speedup": 0.5}]}}, "host_overhead")


def build_trainer(run: str, run_dir: Path, extra: list[str], layers_per_model: int = 12):
    from fp8train.train import precision  # noqa: PLC0415
    from fp8train.train.config import resolve  # noqa: PLC0415
    from fp8train.train.trainer import Trainer  # noqa: PLC0415

    recipe, _, layers = run.partition(":")
    if layers not in ("", "none", "all") or (recipe == "bf16") != (layers == ""):
        raise SystemExit(f"--runs {run!r}: expected bf16, <recipe>:none or <recipe>:all")
    policy = "table" if layers == "none" else "off"
    shipped = precision.shipped_crossovers
    if layers == "none":
        table = no_fp8_table(recipe)
        precision.shipped_crossovers = lambda *_: [table]
    torch._dynamo.reset()
    try:
        overrides = [*SMALL, f"+model.overrides.n_layers={layers_per_model}", *extra]
        return Trainer(resolve(compose("tiny", recipe, 10**6, policy, overrides), run_dir))
    finally:
        precision.shipped_crossovers = shipped


class GcMeter:
    """Seconds the cyclic garbage collector ran while open (gc.callbacks), and how often."""

    def __init__(self):
        self.seconds, self.collections, self._started = 0.0, 0, None

    def __call__(self, phase: str, _info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        elif self._started is not None:
            self.seconds += time.perf_counter() - self._started
            self.collections += 1

    def __enter__(self):
        gc.callbacks.append(self)
        return self

    def __exit__(self, *_exc):
        gc.callbacks.remove(self)


def measure(run: str, args) -> dict:
    logging.getLogger("fp8train").setLevel(logging.WARNING)
    gc.collect()
    objects_at_start = len(gc.get_objects())
    with tempfile.TemporaryDirectory() as tmp:
        trainer = build_trainer(run, Path(tmp) / run.replace(":", "_"), args.extra, args.layers)
        meter = HookMeter(trainer)
        try:
            result = _timed_steps(trainer, meter, args)
        finally:
            meter.restore()
            trainer.close()
        model = weakref.ref(trainer.model)
        result.update(run=run, fp8_layers=len(trainer.conversion_report.converted), objects_at_start=objects_at_start)
        del trainer, meter
        gc.collect()
        result["model_freed"] = model() is None  # False: something global still holds the run
    return result


def _timed_steps(trainer, meter: HookMeter, args) -> dict:
    for _ in range(args.warmup):
        trainer._timed_step()
    steps, hooks = [], []
    with GcMeter() as collector:
        for _ in range(args.steps):
            meter.seconds = 0.0
            started = time.perf_counter()
            trainer._timed_step()
            steps.append(time.perf_counter() - started)
            hooks.append(meter.seconds)
    meter.counter, meter.hook_ops, meter.fp8_calls = OpCounter(), 0, 0
    with meter.counter:
        trainer._timed_step()
    ops, hook_ops, fp8_calls, meter.counter = meter.counter.count, meter.hook_ops, meter.fp8_calls, None
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(args.profile_steps):
        trainer._timed_step()
    profiler.disable()
    per_step = _per_step(profiler, args.profile_steps)
    meter.profiler = cProfile.Profile()  # the bookkeeping alone, cumulative time per function
    for _ in range(args.profile_steps):
        trainer._timed_step()
    hook_profile = _per_step(meter.profiler, args.profile_steps, cumulative=True)
    meter.profiler = None
    return {"step_ms": statistics.median(steps) * 1e3, "hooks_ms": statistics.median(hooks) * 1e3,
            "gc_ms": collector.seconds / args.steps * 1e3, "ops": ops, "hook_ops": hook_ops, "fp8_hook_calls": fp8_calls,
            "py_calls": sum(c for c, _ in per_step.values()), "profile": per_step, "hook_profile": hook_profile}


def _per_step(profiler: cProfile.Profile, steps: int, cumulative: bool = False) -> dict:
    """{function: (calls per step, own (or cumulative) ms per step)}."""
    return {_key(fn): (calls / steps, (cum if cumulative else own) / steps * 1e3)
            for fn, (_, calls, own, cum, _) in pstats.Stats(profiler).stats.items()}


def _key(fn) -> str:
    path, line, name = fn
    path = path.replace(str(REPO) + "/", "")
    for marker in ("site-packages/", "lib/python"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{path}:{line}({name})"


def run_isolated(run: str, args) -> dict:
    cmd = [sys.executable, __file__, "--json-one", run, "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--layers", str(args.layers),
           "--profile-steps", str(args.profile_steps), "--extra", *args.extra]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if result.returncode:
        raise SystemExit(f"{run}: exit {result.returncode}\n{(result.stdout + result.stderr)[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def extra_calls(result: dict, baseline: dict, rows: int) -> list[dict]:
    """Functions this run calls more often per step than the baseline, by extra own time."""
    out = []
    for key, (calls, own) in result["profile"].items():
        base_calls, base_own = baseline["profile"].get(key, (0.0, 0.0))
        if calls > base_calls + 1e-9:
            out.append({"function": key[-90:], "calls/step": f"{calls:.0f}", "bf16_calls": f"{base_calls:.0f}",
                        "extra_own_ms": own - base_own})
    out.sort(key=lambda r: -r["extra_own_ms"])
    for r in out:
        r["extra_own_ms"] = f"{r['extra_own_ms']:.3f}"
    return out[:rows]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", default=["bf16", "hybrid:none", "hybrid:all", "current:none", "bf16"])
    parser.add_argument("--layers", type=int, default=12, help="decoder blocks of the tiny model")
    parser.add_argument("--steps", type=int, default=15, help="timed steps per run (median reported)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--profile-steps", type=int, default=5)
    parser.add_argument("--profile-rows", type=int, default=15)
    parser.add_argument("--isolate", action="store_true", help="each run in its own process")
    parser.add_argument("--ops-only", action="store_true", help="print {run: [ops, hook_ops]} as JSON and stop")
    parser.add_argument("--extra", nargs="*", default=[], help="more Hydra overrides for every run")
    parser.add_argument("--json-one", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help="write every row (and the profiles) as JSON here")
    args = parser.parse_args(argv)
    if args.ops_only:
        args.steps, args.warmup, args.profile_steps = 1, 2, 1
    if args.json_one:
        print(json.dumps(measure(args.json_one, args)))
        return 0
    results = [run_isolated(r, args) if args.isolate else measure(r, args) for r in args.runs]
    if args.ops_only:
        print(json.dumps({r["run"]: {k: r[k] for k in ("fp8_layers", "ops", "hook_ops", "fp8_hook_calls", "py_calls")}
                          for r in results}))
        return 0
    bf16 = next((r for r in results if r["run"] == "bf16"), results[0])
    rows = [{"run": r["run"] + (" (again)" if r is not bf16 and r["run"] == bf16["run"] else ""),
             "fp8_layers": r["fp8_layers"], "step_ms": f"{r['step_ms']:.2f}",
             "vs_bf16": f"{bf16['step_ms'] / r['step_ms']:.2f}x", "hooks_ms": f"{r['hooks_ms']:.2f}", "gc_ms": f"{r['gc_ms']:.2f}",
             "ops/step": r["ops"], "hook_ops": r["hook_ops"], "fp8_hooks": r["fp8_hook_calls"], "py_calls": f"{r['py_calls']:.0f}",
             "objects_at_start": r["objects_at_start"], "model_freed": r["model_freed"]} for r in results]
    print(f"\nper optimizer step on {device_name()}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"tiny model x {args.layers} layers, 4 micro-batches of 2 x 32 tokens; median of {args.steps} steps"
          f"{' (each run in its own process)' if args.isolate else ''}:")
    print_table(rows, COLUMNS)
    for r in results:
        if r["run"] != "bf16":
            print(f"\n{r['run']}: what it calls per step beyond the first bf16 run (cProfile, {args.profile_steps} steps):")
            print_table(extra_calls(r, bf16, args.profile_rows) or [{"function": "(nothing)"}],
                        ["function", "calls/step", "bf16_calls", "extra_own_ms"])
    for r in results:
        top = sorted(r["hook_profile"].items(), key=lambda kv: -kv[1][1])[:args.profile_rows]
        print(f"\n{r['run']}: the per-step bookkeeping by cumulative ms per step (cProfile):")
        print_table([{"function": k[-90:], "calls/step": f"{c:.0f}", "cum_ms": f"{ms:.3f}"} for k, (c, ms) in top],
                    ["function", "calls/step", "cum_ms"])
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
