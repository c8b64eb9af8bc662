"""Where one linear layer's fwd+bwd time goes: GPU busy vs idle, host time, and two timing modes.

    python benchmarks/timeline_linear.py [--shapes 16384,4096,16384 ...] [--recipes hybrid current]

For each variant (BF16 nn.Linear, fp8train recipes, TE recipes when installed) it reports, in ms
per iteration (median of repeats):

* `synced`: one iteration between two CUDA events, then a synchronize (what bench_linear.py times):
  the GPU waits for the host at the start of every iteration;
* `streamed`: 10 iterations back to back between two events, divided by 10: the host runs ahead
  as it does inside a training step, so host time hides behind GPU time where it can;
* `host`: wall time of the Python call alone, iterations back to back;
* `gpu busy`: the sum of kernel durations per iteration from torch.profiler, and the kernels that
  make it up (count per iteration, mean microseconds, share).

`synced - gpu busy` is idle GPU time: launch latency, host work between dependent kernels, syncs.
CUDA only; prints tables; never asserts on time.
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_linear import fwd_bwd, te_recipes  # noqa: E402
from benchmarks.common import cuda_time_ms, device_name, host_time_us, print_table, write_json  # noqa: E402
from fp8train.numerics import FP8Linear, after_optimizer_step, load_recipe  # noqa: E402


def kernel_breakdown(fn, iters: int = 5) -> tuple[float, list[tuple[str, float, float]]]:
    """(GPU busy ms per iteration, [(kernel, calls per iteration, mean us)])."""
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    totals, counts = defaultdict(float), defaultdict(int)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            totals[event.name] += event.device_time  # microseconds
            counts[event.name] += 1
    busy_ms = sum(totals.values()) / iters / 1e3
    kernels = sorted(((name[:70], counts[name] / iters, totals[name] / counts[name]) for name in totals),
                     key=lambda k: -k[1] * k[2])
    return busy_ms, kernels


def te_step(te, te_recipe, shape):
    tokens, k, n = shape
    layer = te.Linear(k, n, bias=False, params_dtype=torch.bfloat16, device="cuda")
    x = torch.randn(tokens, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(tokens, n, device="cuda", dtype=torch.bfloat16)
    autocast = getattr(te, "autocast", None) or te.fp8_autocast
    kwargs = {"recipe": te_recipe} if autocast is not te.fp8_autocast else {"fp8_recipe": te_recipe}

    def step():
        x.grad = None
        layer.weight.grad = None
        with autocast(enabled=True, **kwargs):
            y = layer(x)
        y.backward(grad)
    return step


def variants(shape, recipes, te, te_map):
    tokens, k, n = shape
    base = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(tokens, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(tokens, n, device="cuda", dtype=torch.bfloat16)
    yield "bf16", fwd_bwd(base, x, grad)
    for name in recipes:
        layer = FP8Linear.from_linear(copy.deepcopy(base), load_recipe(name), backend="scaled_mm")
        yield name, fwd_bwd(layer, x, grad, lambda layer=layer: after_optimizer_step(layer))
    for name, rec in te_map.items():
        yield name, te_step(te, rec, shape)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="*", default=["16384,4096,16384", "16384,16384,4096", "4096,2048,2048"])
    parser.add_argument("--recipes", nargs="*", default=["hybrid", "current", "blockwise"])
    parser.add_argument("--kernels", type=int, default=6, help="kernels listed per variant")
    parser.add_argument("--no-te", action="store_true")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("timeline_linear needs a CUDA GPU")
    te, te_map = (None, {}) if args.no_te else te_recipes()
    rows, details = [], []
    for text in args.shapes:
        shape = tuple(int(v) for v in text.split(","))
        for name, step in variants(shape, args.recipes, te, te_map):
            synced, streamed = cuda_time_ms(step), cuda_time_ms(step, warmup=3, repeats=7, chunk=10)
            host = host_time_us(step, calls=10, repeats=7, warmup=3) / 1e3
            busy, kernels = kernel_breakdown(step)
            rows.append({"shape": text, "variant": name, "synced": f"{synced:.3f}", "streamed": f"{streamed:.3f}",
                         "host": f"{host:.3f}", "gpu busy": f"{busy:.3f}", "idle (synced)": f"{synced - busy:.3f}"})
            details.append({"shape": text, "variant": name, "kernels": kernels[:args.kernels]})
            print(rows[-1], flush=True)
            torch.cuda.empty_cache()
    print(f"\nms per fwd+bwd iteration on {device_name()}")
    print_table(rows, ["shape", "variant", "synced", "streamed", "host", "gpu busy", "idle (synced)"])
    for d in details:
        print(f"\n{d['shape']} {d['variant']}: calls/iter, mean us, kernel")
        for name, calls, mean_us in d["kernels"]:
            print(f"  {calls:5.1f}  {mean_us:9.1f}  {name}")
    write_json(args.out, {"device": device_name(), "rows": rows, "details": details})


if __name__ == "__main__":
    main()
