"""Where the time of one FP8 linear fwd+bwd goes: torch.profiler's CUDA kernel table.

    python benchmarks/profile_linear.py --recipe hybrid --shape 16384,4096,16384

Prints the top CUDA kernels by total time over 5 profiled iterations (after warm-up), next to the
same layer in BF16, so a missed fusion or an extra pass over memory shows up as a row.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fp8train.numerics import FP8Linear, after_optimizer_step, load_recipe  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="hybrid")
    parser.add_argument("--shape", default="16384,4096,16384")
    parser.add_argument("--rows", type=int, default=18)
    parser.add_argument("--sort", default="cuda_time_total",
                        help="cuda_time_total (where GPU time goes) or cpu_time_total (host overhead)")
    args = parser.parse_args(argv)
    tokens, k, n = (int(v) for v in args.shape.split(","))
    base = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
    layer = FP8Linear.from_linear(base, load_recipe(args.recipe), backend="scaled_mm")
    x = torch.randn(tokens, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(tokens, n, device="cuda", dtype=torch.bfloat16)

    def step():
        layer(x).backward(grad)
        after_optimizer_step(layer)
    for _ in range(5):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    events = prof.key_averages()
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx",
                                                         "cudaLaunchKernelExC"))
    print(f"recipe {args.recipe}, shape {args.shape}: top ops by {args.sort} over 5 iterations; "
          f"{launches / 5:.0f} kernel launches per iteration")
    print(events.table(sort_by=args.sort, row_limit=args.rows, max_name_column_width=60))


if __name__ == "__main__":
    main()
