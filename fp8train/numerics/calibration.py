"""Start-up calibration: measure BF16 vs FP8 forward+backward for a model's linear-layer shapes.

For each distinct (tokens, in, out) of the model's eligible nn.Linear layers, one bias-free layer
with BF16 weights (what DeepSpeed's BF16 engine holds) runs forward+backward on random BF16 data,
first as nn.Linear, then as FP8Linear with the recipe; speedup = BF16 ms / FP8 ms.

How it is timed decides what "pays" means. The default, STREAMED, queues `chunk` calls back to back
without CUDA graphs, as a training step does: the host runs ahead of the GPU, so a call costs its
GPU time when the GPU is the bottleneck and its launch (host) time when the host is. An FP8 linear
launches more kernels than a BF16 one (casts, amax records), which a small layer cannot hide: on an
H200 the 125M and 350M models trained compiled ran with the GPU busy only 26-60% of the step, and
FP8 layers that won 1.1-1.5x as CUDA graphs made those runs 0.6x (benchmarks/results/
h200x4_session4). GRAPHS replays both as CUDA graphs (torch.cuda.make_graphed_callables /
make_graphed_fp8): pure GPU time, the right measure for a step that is itself CUDA-graphed. Timing:
CUDA events around `chunk` back-to-back calls, median of `repeats`. If a graph cannot be captured
the pair is timed streamed and the method says so.

Results are cached per GPU, torch version and method:

    <cache_dir>/crossover/<device slug>-torch<version>[-graphs].yaml     (crossover.py's file format)

so a second start-up on the same machine measures nothing; only shapes not yet in the file are
measured and added. `calibrated_table` takes the timer as an argument, so the caching and the
decisions are tested on CPU with synthetic timings.
"""

from __future__ import annotations

import copy
import functools
import re
import statistics
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from fp8train.numerics.convert import ModuleFilter, default_filter
from fp8train.numerics.crossover import CrossoverFile, CrossoverTable, GemmShape, Measurement, load_crossover, \
    recipe_class, save_crossover
from fp8train.numerics.cuda_graphs import make_graphed_fp8
from fp8train.numerics.linear import FP8Linear
from fp8train.numerics.recipe import Recipe

Timer = Callable[[GemmShape, Recipe], tuple[float, float, str]]  # -> (bf16 ms, fp8 ms, method)
STREAMED, GRAPHS = "streamed", "graphs"
METHODS = {STREAMED: "fwd+bwd of one bias-free linear, BF16 weights and data, streamed (launch time "
                     "included), median of repeats",
           GRAPHS: "fwd+bwd of one bias-free linear, BF16 weights and data, CUDA graphs, median of repeats"}


def linear_shapes(model: nn.Module, tokens: int, base_filter: ModuleFilter = default_filter) -> list[GemmShape]:
    """Distinct GEMM shapes of the model's plain nn.Linear layers that the base filter would convert."""
    shapes = {GemmShape(tokens, m.in_features, m.out_features) for fqn, m in model.named_modules()
              if type(m) is nn.Linear and fqn and base_filter(fqn, m) is True}
    return sorted(shapes)


def device_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def cache_path(cache_dir: Path, device_name: str, method: str = STREAMED) -> Path:
    tail = "" if method == STREAMED else f"-{method}"
    return Path(cache_dir) / "crossover" / f"{device_slug(device_name)}-torch{device_slug(torch.__version__)}{tail}.yaml"


def calibrated_table(shapes: list[GemmShape], recipe: Recipe, cache_dir: Path | None, device_name: str,
                     timer: Timer | None = None, log: Callable[[str], None] = lambda _: None,
                     method: str = STREAMED) -> CrossoverTable:
    """The crossover table of `recipe`'s class on this device for `shapes`: cached rows reused,
    missing rows measured with `timer` (default: `time_fwd_bwd` on the current CUDA device, timed
    as `method` says: STREAMED or GRAPHS, see the module docstring)."""
    if method not in METHODS:
        raise ValueError(f"calibration method {method!r}: choose one of {sorted(METHODS)}")
    klass = recipe_class(recipe)
    path = cache_path(cache_dir, device_name, method) if cache_dir is not None else None
    cached = load_crossover(path) if path is not None and path.is_file() else None
    tables = dict(cached.tables) if cached is not None else {}
    known = {m.shape: m for m in (tables[klass].measurements if klass in tables else ())}
    missing = [s for s in shapes if s not in known]
    timer = timer or functools.partial(time_fwd_bwd, graphs=method == GRAPHS)
    methods = {cached.method} if cached is not None and cached.method else set()
    for shape in missing:
        bf16_ms, fp8_ms, method = timer(shape, recipe)
        measured = Measurement(shape, bf16_ms / fp8_ms, bf16_ms, fp8_ms)
        known[shape] = Measurement.from_dict(measured.to_dict(), "calibration")  # as the cache stores it
        methods.add(method)
        log(f"calibration {recipe.name} ({klass}) {shape}: BF16 {bf16_ms:.3f} ms, FP8 {fp8_ms:.3f} ms, "
            f"{bf16_ms / fp8_ms:.2f}x ({method})")
    source = str(path) if path is not None else "start-up calibration (not cached)"
    method = "; ".join(sorted(methods))
    tables[klass] = CrossoverTable(device_name, klass, tuple(known.values()), source, method)
    if path is not None and missing:
        save_crossover(path, CrossoverFile(device_name, device_name, str(torch.__version__), method,
                                           "fp8train.numerics.calibration", tables))
    return tables[klass]


def time_fwd_bwd(shape: GemmShape, recipe: Recipe, repeats: int = 10, chunk: int = 5,
                 warmup: int = 3, graphs: bool = False) -> tuple[float, float, str]:
    """(BF16 ms, FP8 ms, method) for one shape on the current CUDA device (see the module docstring)."""
    if not torch.cuda.is_available():
        raise ValueError("precision calibration times GEMMs on a CUDA GPU; on this machine use "
                         "precision_policy=table or off")
    base = nn.Linear(shape.in_features, shape.out_features, bias=False, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(shape.tokens, shape.in_features, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(shape.tokens, shape.out_features, device="cuda", dtype=torch.bfloat16)
    native = "auto" if recipe.backend == "te" else None  # TE swaps modules; time the native path
    bf16, fp8 = copy.deepcopy(base), FP8Linear.from_linear(copy.deepcopy(base), recipe, native)
    calls, method = (bf16, fp8), "streamed"
    if graphs:
        try:
            calls = (torch.cuda.make_graphed_callables(bf16, (x,)), make_graphed_fp8(fp8, (x,)))
            method = "CUDA graphs"
        except Exception as error:  # noqa: BLE001 - a capture failure must not stop training; say so
            torch.cuda.synchronize()
            method = f"streamed (graph capture failed: {type(error).__name__})"
    times = []
    for call, layer in zip(calls, (bf16, fp8)):
        times.append(cuda_time_ms(_step(call, layer, x, grad), warmup, repeats, chunk))
    del calls
    torch.cuda.empty_cache()
    return times[0], times[1], method


def _step(call, layer: nn.Module, x: torch.Tensor, grad: torch.Tensor):
    params = list(layer.parameters())

    def step():
        x.grad = None
        for p in params:
            p.grad = None
        call(x).backward(grad)
    return step


def cuda_time_ms(fn, warmup: int = 5, repeats: int = 20, chunk: int = 1) -> float:
    """Median wall time of fn() in milliseconds, timed with CUDA events (also the benchmarks' timer).

    chunk > 1 queues that many calls between the two events and divides: the host runs ahead
    as it does inside a training step ("streamed"), instead of starting every call on an idle GPU."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(chunk):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / chunk)
    return statistics.median(times)
