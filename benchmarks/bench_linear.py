"""Forward+backward time of one linear layer: BF16 vs fp8train recipes vs Transformer Engine.

    python benchmarks/bench_linear.py [--shapes 16384,4096,16384 ...] [--recipes ...] [--out f.json]
                                      [--graphs 4096,2048,2048 ...] [--compiled 4096,2048,2048 ...]

Every FP8 iteration pays for what a training step pays: the weight is re-cast (cache invalidated)
and delayed scales are updated, as after an optimizer step. TE's te.Linear runs inside its autocast
with DelayedScaling / Float8CurrentScaling / Float8BlockScaling when TE is installed. Speedups are
over the BF16 nn.Linear measured in the same run. CUDA only; never asserts on time.

`--graphs SHAPES` adds rows where every variant (BF16 too) runs as a CUDA graph
(fp8train.numerics.make_graphed_fp8, te.make_graphed_callables, torch.cuda.make_graphed_callables):
what small, host-bound layers gain when launches stop costing host time. `--compiled SHAPES`
adds rows where BF16 and fp8train's layers run under torch.compile (TE is not compiled: "-").
"""

from __future__ import annotations

import argparse
import copy
import inspect
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import cuda_time_ms, device_name, print_table, speedup_or_error, write_json  # noqa: E402
from fp8train.numerics import FP8Linear, after_optimizer_step, load_recipe, make_graphed_fp8  # noqa: E402
from fp8train.quant.casts import configure_casts  # noqa: E402

DEFAULT_SHAPES = ["16384,4096,16384", "16384,16384,4096", "16384,4096,4096", "4096,2048,2048"]
DEFAULT_RECIPES = ["hybrid", "current", "rowwise", "blockwise", "v3_fp8"]


def fwd_bwd(layer, x, grad, after_step=None):
    def step():
        x.grad = None
        for p in layer.parameters():
            p.grad = None
        y = layer(x)
        y.backward(grad)
        if after_step is not None:
            after_step()
    return step


def fwd_bwd_wrapped(wrapped, params, x, grad, after_step=None):
    """fwd_bwd for a graphed or compiled callable standing in for the layer."""
    def step():
        for p in params:
            p.grad = None
        wrapped(x).backward(grad)
        if after_step is not None:
            after_step()
    return step


def time_fp8train(shape, recipe_name, base, graphs=False, compiled=False):
    tokens, k, n = shape
    layer = FP8Linear.from_linear(copy.deepcopy(base), load_recipe(recipe_name), backend="scaled_mm")
    x = torch.randn(tokens, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(tokens, n, device="cuda", dtype=torch.bfloat16)
    update = lambda: after_optimizer_step(layer)  # noqa: E731
    if compiled:
        return cuda_time_ms(fwd_bwd_wrapped(torch.compile(layer), list(layer.parameters()), x, grad, update))
    if graphs:
        return cuda_time_ms(fwd_bwd_wrapped(make_graphed_fp8(layer, (x,)), list(layer.parameters()), x, grad, update))
    return cuda_time_ms(fwd_bwd(layer, x, grad, update))


def te_recipes():
    try:
        import transformer_engine.pytorch as te  # noqa: PLC0415
        from transformer_engine.common import recipe as te_recipe  # noqa: PLC0415
    except Exception:
        return None, {}
    return te, {"te_delayed": te_recipe.DelayedScaling(), "te_current": te_recipe.Float8CurrentScaling(),
                "te_block": te_recipe.Float8BlockScaling()}


def te_graphed(te, layer, x, te_recipe):
    """te.make_graphed_callables with FP8 on (its keyword names changed across TE releases)."""
    params = inspect.signature(te.make_graphed_callables).parameters
    if "fp8_enabled" in params:
        kwargs = {"fp8_enabled": True, "fp8_recipe": te_recipe}
    else:
        kwargs = {"enabled": True, "recipe": te_recipe}
    return te.make_graphed_callables(layer, (x,), **kwargs)


def time_te(te, te_recipe, shape, graphs=False):
    tokens, k, n = shape
    layer = te.Linear(k, n, bias=False, params_dtype=torch.bfloat16, device="cuda")
    x = torch.randn(tokens, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(tokens, n, device="cuda", dtype=torch.bfloat16)
    if graphs:  # the graphed callable runs its own FP8 autocast
        return cuda_time_ms(fwd_bwd_wrapped(te_graphed(te, layer, x, te_recipe), list(layer.parameters()), x, grad))
    autocast = getattr(te, "autocast", None) or te.fp8_autocast
    kwargs = {"recipe": te_recipe} if autocast is not te.fp8_autocast else {"fp8_recipe": te_recipe}

    def step():
        x.grad = None
        for p in layer.parameters():
            p.grad = None
        with autocast(enabled=True, **kwargs):
            y = layer(x)
        y.backward(grad)
    return cuda_time_ms(step)


def bench_shape(shape, recipes, te, te_map, graphs=False, compiled=False):
    tokens, k, n = shape
    base = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(tokens, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(tokens, n, device="cuda", dtype=torch.bfloat16)
    if compiled:
        bf16 = copy.deepcopy(base)
        bf16_ms = cuda_time_ms(fwd_bwd_wrapped(torch.compile(bf16), list(bf16.parameters()), x, grad))
    elif graphs:
        bf16 = copy.deepcopy(base)
        bf16_ms = cuda_time_ms(fwd_bwd_wrapped(torch.cuda.make_graphed_callables(bf16, (x,)),
                                               list(bf16.parameters()), x, grad))
    else:
        bf16_ms = cuda_time_ms(fwd_bwd(base, x, grad))
    label = " graphed" if graphs else " compiled" if compiled else ""
    row = {"shape": f"{tokens},{k}->{n}{label}", "bf16_ms": f"{bf16_ms:.3f}"}
    for name in recipes:
        row[name] = speedup_or_error(bf16_ms, lambda: time_fp8train(shape, name, base, graphs, compiled))
    for name, rec in te_map.items():
        row[name] = "-" if compiled else speedup_or_error(bf16_ms, lambda: time_te(te, rec, shape, graphs))
    torch.cuda.empty_cache()
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="*", default=DEFAULT_SHAPES)
    parser.add_argument("--recipes", nargs="*", default=DEFAULT_RECIPES)
    parser.add_argument("--graphs", nargs="*", default=[], help="shapes to time again as CUDA graphs")
    parser.add_argument("--compiled", nargs="*", default=[], help="shapes to time again under torch.compile")
    parser.add_argument("--compiled-casts", default="auto", choices=["auto", "operators", "inductor"],
                        help="how casts run under torch.compile (fp8train.quant.casts.configure_casts)")
    parser.add_argument("--no-te", action="store_true")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_linear needs a CUDA GPU with FP8 (H100); none found")
    configure_casts(compiled_route=args.compiled_casts)
    te, te_map = (None, {}) if args.no_te else te_recipes()
    parse = lambda s: tuple(int(v) for v in s.split(","))  # noqa: E731
    rows = [bench_shape(parse(s), args.recipes, te, te_map) for s in args.shapes]
    rows += [bench_shape(parse(s), args.recipes, te, te_map, graphs=True) for s in args.graphs]
    rows += [bench_shape(parse(s), args.recipes, te, te_map, compiled=True) for s in args.compiled]
    print(f"\nforward+backward speedup over BF16 nn.Linear on {device_name()} (median of 20)")
    columns = ["shape", "bf16_ms", *args.recipes, *te_map]
    table = print_table(rows, columns)
    write_json(args.out, {"device": device_name(), "rows": rows, "table": table})


if __name__ == "__main__":
    main()
