"""MoE layer forward+backward: BF16 vs fp8train native FP8 vs Transformer Engine FP8.

    python benchmarks/bench_moe.py [--tokens 8192 --dim 2048 --experts 16 --top-k 2 --hidden 1408]

The same DeepSeek-style MoE block (router in FP32, shared expert, routed experts) is timed with its
expert and shared-expert GEMMs in BF16 (torch._grouped_mm), through fp8train's FP8 grouped
function (scaled_mm backend, per-expert loop) and through te.GroupedLinear / te.Linear.
CUDA only; prints a table of medians; never asserts on time.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import cuda_time_ms, device_name, print_table, speedup_or_error, write_json  # noqa: E402
from fp8train.models.moe import MoE, MoEConfig  # noqa: E402
from fp8train.numerics import after_optimizer_step, convert_to_fp8, load_recipe  # noqa: E402
from fp8train.numerics.grouped_linear import describe_grouped_gemms  # noqa: E402
from fp8train.numerics.te_backend import te_available  # noqa: E402


def build_block(args) -> MoE:
    config = MoEConfig(n_routed_experts=args.experts, n_shared_experts=1, top_k=args.top_k,
                       expert_ffn_hidden=args.hidden)
    return MoE(args.dim, config).cuda().to(torch.bfloat16)


def time_block(block, x, grad, after_step=None) -> float:
    def step():
        out, aux = block(x)
        (out.float() * grad).sum().add(aux).backward()
        if after_step is not None:
            after_step()
    return cuda_time_ms(step, warmup=3, repeats=10)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=1408)
    parser.add_argument("--recipes", nargs="*", default=["hybrid", "current", "blockwise"])
    parser.add_argument("--profile", metavar="RECIPE", help="also profile the native block with RECIPE")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_moe needs a CUDA GPU with FP8 (H100); none found")
    torch.manual_seed(0)
    base = build_block(args)
    x = torch.randn(1, args.tokens, args.dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(1, args.tokens, args.dim, device="cuda", dtype=torch.float32)
    bf16_ms = time_block(base, x, grad)
    rows = [{"variant": "bf16", "ms": f"{bf16_ms:.2f}", "speedup": "1.00x"}]
    backends = [("native", "scaled_mm")] + ([("te", "te")] if te_available()[0] else [])
    grouped_plans = {}
    for recipe_name in args.recipes:
        for label, backend in backends:
            block = copy.deepcopy(base)
            times = []

            def run(block=block):
                convert_to_fp8(block, load_recipe(recipe_name), backend=backend)
                times.append(time_block(block, x, grad, lambda: after_optimizer_step(block)))
                return times[-1]
            speedup = speedup_or_error(bf16_ms, run)
            if label == "native":
                grouped_plans[recipe_name] = describe_grouped_gemms(block, x.dtype)
            ms = f"{times[-1]:.2f}" if times else "-"
            rows.append({"variant": f"{label} {recipe_name}", "ms": ms, "speedup": speedup})
            del block
            torch.cuda.empty_cache()
    print(f"\nMoE block fwd+bwd, {args.tokens} tokens, dim {args.dim}, {args.experts} experts top-{args.top_k}, "
          f"expert hidden {args.hidden}, on {device_name()}")
    table = print_table(rows, ["variant", "ms", "speedup"])
    for recipe_name, plan in grouped_plans.items():
        print(f"native {recipe_name} expert GEMMs: {plan}")
    write_json(args.out, {"device": device_name(), "args": vars(args), "rows": rows, "table": table})
    if args.profile:
        profile_block(base, x, grad, args.profile)


def profile_block(base, x, grad, recipe_name):
    """Where the native FP8 block's time goes: top ops by host (self CPU) and by GPU time."""
    from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415

    block = copy.deepcopy(base)
    convert_to_fp8(block, load_recipe(recipe_name), backend="scaled_mm")
    time_block(block, x, grad, lambda: after_optimizer_step(block))  # warm-up
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            out, aux = block(x)
            (out.float() * grad).sum().add(aux).backward()
            after_optimizer_step(block)
        torch.cuda.synchronize()
    events = prof.key_averages()
    for sort in ("self_cpu_time_total", "cuda_time_total"):
        print(f"\nnative {recipe_name} MoE block, 3 iterations, top ops by {sort}")
        print(events.table(sort_by=sort, row_limit=22, max_name_column_width=55))


if __name__ == "__main__":
    main()
