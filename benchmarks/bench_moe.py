"""MoE block forward+backward: BF16 vs fp8train's FP8 grouped experts (vs TE when installed).

    python benchmarks/bench_moe.py                       # both issue-#11 layers, every FP8 recipe
    python benchmarks/bench_moe.py --layers small --recipes hybrid --profile hybrid
    python benchmarks/bench_moe.py --policy --crossover-out recipes/crossover/nvidia_h200.yaml
        # + the trainer's precision policy per recipe; the block speedups become grouped:<class> rows
    TRITON_INTERPRET=1 python benchmarks/bench_moe.py --dry-run   # CPU check of the script (tiny layer)

Layers (issue #11): large = 16384 tokens, d 7168, 32 experts top-8, expert hidden 2048; small = 8192
tokens, d 2048, 16 experts top-2, hidden 1408. The same DeepSeek-style block (FP32 router, one shared
expert, routed SwiGLU experts) is timed with its expert and shared-expert GEMMs in BF16
(torch._grouped_mm, nn.Linear), through fp8train's FP8 layers (scaled_mm backend: one Triton grouped
GEMM per pass for all experts, tokens cast once before dispatch) and through te.GroupedLinear when
Transformer Engine is importable. Per layer it prints
  * the block table: median ms per fwd+bwd (CUDA events), speedup over BF16 measured in the same run;
  * per grouped GEMM (output, grad_input, grad_weight; gate|up and down shapes): ms and useful
    TFLOP/s (2 T N K over real rows) of the FP8 kernel and of torch._grouped_mm BF16, on the
    operands the layer itself prepares (`--gemms large small`, default large);
  * FLOP waste of the GEMM tiles on this routing, and the casts per MoE layer.
Never asserts on time. --profile RECIPE: top ops by host and GPU time for that recipe's block.
--graphs LAYER...: also time every variant as a CUDA graph (BF16 via make_graphed_callables, FP8 via
make_graphed_fp8: the FP8 block is sync-free, so it captures whole; replays see new routing).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import device_name, print_table, speedup_or_error, write_json  # noqa: E402
from benchmarks.grouped_gemm_cases import LAYERS  # noqa: E402
from benchmarks.moe_crossover import crossover_rows, merge_into, policy_filter  # noqa: E402
from benchmarks.moe_parts import count_casts, flop_waste_row, gemm_rows, routed_sizes, time_ms  # noqa: E402
from fp8train.models.moe import MoE, MoEConfig  # noqa: E402
from fp8train.numerics import after_optimizer_step, convert_to_fp8, load_recipe, make_graphed_fp8  # noqa: E402
from fp8train.numerics.grouped_linear import describe_grouped_gemms  # noqa: E402
from fp8train.numerics.te_backend import te_available  # noqa: E402

RECIPES = ["hybrid", "current", "blockwise", "v3_fp8"]


def build_block(layer, device: str, dtype, weight_before_down: bool = False) -> MoE:
    config = MoEConfig(n_routed_experts=layer.experts, n_shared_experts=1, top_k=layer.top_k,
                       expert_ffn_hidden=layer.hidden, route_weight_before_down=weight_before_down)
    return MoE(layer.dim, config).to(device=device, dtype=dtype)


def fwd_bwd(block, x, grad, after_step=None, fresh_grads: bool = False):
    """One forward + backward. fresh_grads: the parameters' .grad set to None first, so backward
    writes new gradients instead of adding into the previous iteration's (the first micro-batch of a
    step; by default every iteration after the first accumulates, in BF16 and FP8 alike)."""
    if fresh_grads:
        block.zero_grad(set_to_none=True)
    out, aux = block(x)
    (out.float() * grad).sum().add(aux).backward()
    if after_step is not None:
        after_step()


def time_block(block, x, grad, repeats: int, after_step=None, fresh_grads: bool = False) -> float:
    return time_ms(lambda: fwd_bwd(block, x, grad, after_step, fresh_grads), repeats)


def time_graphed(block, x, grad, repeats: int, fp8: bool) -> float:
    """The block captured as a CUDA graph (forward and backward), replayed on x."""
    sample = x.detach().clone().requires_grad_()
    call = make_graphed_fp8(block, (sample,)) if fp8 else torch.cuda.make_graphed_callables(block, (sample,))
    return time_ms(lambda: fwd_bwd(call, x, grad, (lambda: after_optimizer_step(block)) if fp8 else None), repeats)


def graphed_rows(base, x, grad, args) -> list[dict]:
    """Every variant as a CUDA graph, BF16 first (one graph pool alive at a time)."""
    rows, bf16_ms = [], None
    for recipe_name in ["bf16", *args.recipes]:
        block = copy.deepcopy(base)
        if recipe_name != "bf16":
            convert_to_fp8(block, load_recipe(recipe_name), backend=args.backend)
        try:
            ms = time_graphed(block, x, grad, args.repeats, recipe_name != "bf16")
            bf16_ms = bf16_ms or ms
            rows.append({"variant": f"graphed {recipe_name}", "ms": f"{ms:.2f}", "speedup": f"{bf16_ms / ms:.2f}x"})
        except Exception as exc:  # one failing variant must not lose the table
            torch.cuda.synchronize()
            rows.append({"variant": f"graphed {recipe_name}", "ms": "-",
                         "speedup": f"error: {type(exc).__name__}: {str(exc)[:60]}"})
        del block
        torch.cuda.empty_cache()
    return rows


def policy_rows(base, x, grad, layer, bf16_ms: float, args, measured: dict) -> list[dict]:
    """Each recipe as the trainer's table policy converts it on this GPU (BF16 where FP8 loses),
    with this run's block speedups as the grouped rows (what --crossover-out ships)."""
    rows = []
    for recipe_name in args.recipes:
        block = copy.deepcopy(base)
        policy = policy_filter(recipe_name, device_name(), layer.tokens, measured)
        report = convert_to_fp8(block, load_recipe(recipe_name), module_filter=policy, backend=args.backend)
        ms = time_block(block, x, grad, args.repeats, lambda block=block: after_optimizer_step(block),
                        args.fresh_grads)
        experts = [d for d in policy.decisions if d.grouped]
        kept = (f"{sum(d.fp8 for d in experts)}/{len(experts)} expert layers FP8" if experts
                else f"{policy.unjudged_grouped} expert layers FP8 (no grouped table)")
        rows.append({"variant": f"policy {recipe_name} ({kept}; {len(report.converted)} FP8 layers in all)",
                     "ms": f"{ms:.2f}", "speedup": f"{bf16_ms / ms:.2f}x"})
        del block
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return rows


def bench_layer(name: str, args, device: str, dtype) -> dict:
    layer = LAYERS[name]
    torch.manual_seed(0)
    base = build_block(layer, device, dtype, args.weight_before_down)
    x = torch.randn(1, layer.tokens, layer.dim, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(1, layer.tokens, layer.dim, device=device, dtype=torch.float32)
    sizes = routed_sizes(base, x)
    print(f"\n== {name}: {layer.tokens} tokens, d {layer.dim}, {layer.experts} experts top-{layer.top_k}, "
          f"hidden {layer.hidden}; rows per expert {min(sizes)}..{max(sizes)}, on {device_name()}", flush=True)
    bf16_ms = time_block(base, x, grad, args.repeats, fresh_grads=args.fresh_grads)
    rows = [{"variant": "bf16", "ms": f"{bf16_ms:.2f}", "speedup": "1.00x"}]
    backends = [("native", args.backend)] + ([("te", "te")] if te_available()[0] else [])
    plans, casts, waste = {}, {}, []
    for recipe_name in args.recipes:
        for label, backend in backends:
            block = copy.deepcopy(base)
            times = []

            def run(block=block, backend=backend):
                convert_to_fp8(block, load_recipe(recipe_name), backend=backend)
                times.append(time_block(block, x, grad, args.repeats, lambda: after_optimizer_step(block),
                                        args.fresh_grads))
                return times[-1]
            speedup = speedup_or_error(bf16_ms, run)
            rows.append({"variant": f"{label} {recipe_name}", "ms": f"{times[-1]:.2f}" if times else "-",
                         "speedup": speedup})
            if label == "native" and times:
                plans[recipe_name] = describe_grouped_gemms(block)
                casts[recipe_name] = count_casts(block, x)
                waste.append(flop_waste_row(block, sizes, recipe_name))
            del block
            if device == "cuda":
                torch.cuda.empty_cache()
    fp8_ms = {r["variant"].split(" ", 1)[1]: float(r["ms"]) for r in rows
              if r["variant"].startswith("native ") and r["ms"] != "-"}
    measured = crossover_rows(layer, bf16_ms, fp8_ms)
    if args.policy:
        rows += policy_rows(base, x, grad, layer, bf16_ms, args, measured)
    if args.policy:  # the BF16 block once more, last: what earlier FP8 runs leave behind in this process
        again = time_block(base, x, grad, args.repeats, fresh_grads=args.fresh_grads)
        rows.append({"variant": "bf16 (timed again, last)", "ms": f"{again:.2f}", "speedup": f"{bf16_ms / again:.2f}x"})
    if name in args.graphs and device == "cuda":
        rows += graphed_rows(base, x, grad, args)
    table = print_table(rows, ["variant", "ms", "speedup"])
    for recipe_name, plan in plans.items():
        print(f"native {recipe_name}: {plan}; casts per MoE layer fwd+bwd: {casts[recipe_name]}")
    if waste:
        print(f"\nFLOP waste of GEMM tiles, % over useful FLOPs, {name} layer (this routing)")
        print_table(waste, ["recipe", "output/grad_input", "grad_weight", "whole layer"])
    result = {"crossover": measured, "rows": rows, "table": table, "plans": plans, "casts": casts, "waste": waste, "sizes": sizes}
    if name in args.gemms:
        gemms = [r for recipe_name in args.recipes for r in gemm_rows(base, x, recipe_name, args)]
        print(f"\nGrouped GEMMs of the {name} layer: ms / useful TFLOP/s, FP8 (one launch for all experts) "
              f"vs BF16 torch._grouped_mm, on {device_name()}")
        result["gemms"] = gemms
        result["gemm_table"] = print_table(gemms, ["recipe", "gemm", "shape", "fp8", "bf16", "fp8/bf16"])
    if args.profile and args.profile in args.recipes:
        profile_block(base, x, grad, args.profile, args.backend)
    return result


def profile_block(base, x, grad, recipe_name: str, backend: str) -> None:
    """Where the FP8 block's time goes: top ops by host (self CPU) and by GPU time."""
    from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415

    block = copy.deepcopy(base)
    convert_to_fp8(block, load_recipe(recipe_name), backend=backend)
    fwd_bwd(block, x, grad, lambda: after_optimizer_step(block))  # warm-up
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        for _ in range(3):
            fwd_bwd(block, x, grad, lambda: after_optimizer_step(block))
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    events = prof.key_averages()
    for sort in ("self_cpu_time_total", "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"):
        print(f"\nnative {recipe_name} MoE block, 3 iterations, top ops by {sort}")
        print(events.table(sort_by=sort, row_limit=25, max_name_column_width=60))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", nargs="*", default=["large", "small"], choices=["large", "small", "tiny"])
    parser.add_argument("--gemms", nargs="*", default=["large"], help="layers whose grouped GEMMs are timed")
    parser.add_argument("--recipes", nargs="*", default=RECIPES)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--graphs", nargs="*", default=[], help="layers also timed as CUDA graphs (e.g. small)")
    parser.add_argument("--profile", metavar="RECIPE", help="also profile the FP8 block with RECIPE")
    parser.add_argument("--weight-before-down", action="store_true",
                        help="every block (BF16 too) with MoEConfig.route_weight_before_down: routing weights "
                             "in down_proj's input, a plain-sum combine")
    parser.add_argument("--fresh-grads", action="store_true",
                        help="set .grad to None before every eager iteration (no accumulation into the "
                             "previous one's gradients; BF16 and FP8 alike)")
    parser.add_argument("--dry-run", action="store_true", help="CPU check of this script: tiny layer, emulated")
    parser.add_argument("--policy", action="store_true",
                        help="also time each recipe as the trainer's table precision policy converts it")
    parser.add_argument("--crossover-out", type=Path, metavar="YAML",
                        help="add the measured block speedups as grouped:<class> rows to this crossover file")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    device, dtype, args.backend = "cuda", torch.bfloat16, "scaled_mm"
    if args.dry_run:
        if os.environ.get("TRITON_INTERPRET") != "1":
            sys.exit("--dry-run runs on the CPU with the Triton interpreter: set TRITON_INTERPRET=1")
        device, dtype, args.backend, args.repeats = "cpu", torch.float32, "emulated", 1
        args.layers, args.gemms = ["tiny"], ["tiny"]
    elif not torch.cuda.is_available():
        sys.exit("bench_moe needs a CUDA GPU with FP8 (H100); --dry-run checks the script on the CPU")
    print(f"device: {device_name()}, torch {torch.__version__}, recipes {args.recipes}, "
          f"TE: {te_available()[1] if not te_available()[0] else 'yes'}")
    results = {name: bench_layer(name, args, device, dtype) for name in args.layers}
    if args.crossover_out:
        rows: dict = {}
        for result in results.values():
            for klass, measurements in result.pop("crossover").items():
                rows.setdefault(klass, []).extend(measurements)
        print(f"grouped crossover rows -> {merge_into(args.crossover_out, device_name(), str(torch.__version__), rows)}")
    for result in results.values():
        result.pop("crossover", None)
    write_json(args.out, {"device": device_name(), "args": {k: str(v) for k, v in vars(args).items()},
                          "layers": results})


if __name__ == "__main__":
    main()
