"""Pieces of bench_moe.py: routing sizes, per-GEMM timings on the layer's own operands, FLOP waste of
the GEMM tiles, and a count of the casts one MoE layer runs per forward+backward."""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager

import torch

from benchmarks.common import time_ms
from fp8train.models.dispatch import dispatch_plan
from fp8train.models.moe import route
from fp8train.numerics import FP8GroupedLinear, load_recipe
from fp8train.numerics import grouped_dispatch
from fp8train.numerics.grouped_layout import group_ends, padded_groups
from fp8train.numerics.grouped_linear_function import cast_tokens
from fp8train.numerics.role_caster import RoleCaster
from fp8train.quant.schemes import BLOCK
from kernels.grouped_gemm_configs import Form, Scaling, pick_config


@torch.no_grad()
def routing(block, x):
    """(group_sizes [E] on the device, token_index [T]) of the block's router on x [1, N, D]."""
    x_flat = x.reshape(-1, x.shape[-1])
    _, topk_idx, _ = route(block.router_logits(x_flat), block.config)
    group_sizes, plan = dispatch_plan(topk_idx, block.config.n_routed_experts)
    return group_sizes, plan.token_index


def routed_sizes(block, x) -> list[int]:
    return routing(block, x)[0].tolist()


# ---------------------------------------------------------------- FLOP waste
def _experts_cost(sizes, bm: int) -> int:
    return sum(-(-s // bm) * bm for s in sizes)


def _tokens_cost(sizes, bk: int, tail: int, pad: int | None) -> int:
    if pad:
        return sum(-(-s // pad) * pad for s in sizes)
    return sum(s // bk * bk + -(-(s % bk) // tail) * tail for s in sizes)


def flop_waste_row(block, sizes: list[int], recipe_name: str) -> dict:
    """Extra FLOPs over the useful 2 T N K of every grouped GEMM, with the tile configs the kernels
    pick for this layer (experts form: whole BM-row tiles per expert; tokens form: whole BK chunks
    plus TAIL_K tail chunks, or whole 128-token chunks where the layer pads its token groups)."""
    blockwise = load_recipe(recipe_name).gemm_class.value == "blockwise"
    scaling = Scaling.BLOCKWISE if blockwise else Scaling.TENSORWISE
    real, rows_per_group = sum(sizes), sum(sizes) / len(sizes)
    useful = {"experts": 0, "tokens": 0}
    spent = {"experts": 0, "tokens": 0}
    for proj in (block.experts.gate_proj, block.experts.up_proj, block.experts.down_proj):
        n, k = proj.weight.shape[1:]
        for gemm_n, fast in ((n, True), (k, False)):  # output (N = out), grad_input (N = in)
            bm = pick_config(Form.EXPERTS, scaling, gemm_n, rows_per_group, fast and not blockwise, False).bm
            useful["experts"] += real * n * k
            spent["experts"] += _experts_cost(sizes, bm) * n * k
        cfg = pick_config(Form.TOKENS, scaling, k, real, False, False)
        useful["tokens"] += real * n * k
        pad = getattr(proj, "tokens_align", BLOCK if blockwise else None)  # padded token groups (FP8 layers)
        spent["tokens"] += _tokens_cost(sizes, cfg.bk, cfg.tail_k, pad) * n * k
    pct = {f: 100 * (spent[f] / useful[f] - 1) for f in useful}
    whole = 100 * (sum(spent.values()) / sum(useful.values()) - 1)
    return {"recipe": recipe_name, "output/grad_input": f"{pct['experts']:.2f}%",
            "grad_weight": f"{pct['tokens']:.2f}%", "whole layer": f"{whole:.2f}%"}


# ---------------------------------------------------------------- casts per layer
@contextmanager
def counting_casts(casters: set[int], counts: Counter):
    """Count RoleCaster.cast / cast_cols calls of the given casters, and FP8 row gathers."""
    cast, cast_cols, gather = RoleCaster.cast, RoleCaster.cast_cols, grouped_dispatch.gather_rows

    def counted_cast(self, *a, **kw):
        counts["casts"] += id(self) in casters
        return cast(self, *a, **kw)

    def counted_cols(self, *a, **kw):
        counts["casts"] += id(self) in casters
        return cast_cols(self, *a, **kw)

    def counted_gather(*a, **kw):
        counts["fp8 row gathers"] += 1
        return gather(*a, **kw)
    RoleCaster.cast, RoleCaster.cast_cols, grouped_dispatch.gather_rows = counted_cast, counted_cols, counted_gather
    try:
        yield counts
    finally:
        RoleCaster.cast, RoleCaster.cast_cols, grouped_dispatch.gather_rows = cast, cast_cols, gather


def count_casts(block, x) -> str:
    """Activation/gradient casts of the routed experts per fwd+bwd (weights: cast once per step, cached):
    the cast-once path, and each projection casting its own input (the previous design)."""
    casters = {id(m) for m in block.experts.modules() if isinstance(m, RoleCaster)}
    group_sizes, token_index = routing(block, x)
    x_flat = x.detach().reshape(-1, x.shape[-1]).requires_grad_()
    results = {}
    for label, sorted_input in (("cast once", False), ("per projection", True)):
        block.experts(x_flat, group_sizes, token_index).float().sum().backward()  # warm-up: weights cached
        with counting_casts(casters, Counter()) as counts:
            if sorted_input:
                block.experts(x_flat[token_index], group_sizes).float().sum().backward()
            else:
                block.experts(x_flat, group_sizes, token_index).float().sum().backward()
        results[label] = dict(counts)
    block.zero_grad(set_to_none=True)
    return "; ".join(f"{k}: {v}" for k, v in results.items()) + "; weights: 3 per optimizer step"


# ---------------------------------------------------------------- per-GEMM timings
def gemm_rows(base, x, recipe_name: str, args) -> list[dict]:
    """Each grouped GEMM of the gate|up and down projections, on the operands the layer prepares."""
    group_sizes, token_index = routing(base, x)
    x_sorted = x.detach().reshape(-1, x.shape[-1])[token_index]
    rows = []
    for proj_name, proj in (("gate|up", base.experts.gate_proj), ("down", base.experts.down_proj)):
        layer = FP8GroupedLinear.from_grouped(proj, load_recipe(recipe_name), backend=args.backend)
        inputs = torch.randn(x_sorted.shape[0], layer.in_features, device=x.device, dtype=x.dtype)
        dy = torch.randn(x_sorted.shape[0], layer.out_features, device=x.device, dtype=x.dtype)
        rows += _gemm_rows_of(layer, inputs, dy, group_sizes, recipe_name, proj_name, args.repeats)
    return rows


def _gemm_rows_of(layer, x, dy, group_sizes, recipe_name, proj_name, repeats) -> list[dict]:
    tokens, (n, k) = x.shape[0], (layer.out_features, layer.in_features)
    offs = group_ends(group_sizes)
    padded = padded_groups(group_sizes, tokens, BLOCK) if layer.tokens_align else None
    x_rows, x_cols = cast_tokens(layer.input_caster, x, True, padded)
    dy_rows, dy_cols = cast_tokens(layer.grad_output_caster, dy, True, padded)
    w_rows, w_cols = layer.fp8_weights()
    w_hp, be = layer.weight.detach(), layer.backend
    token_offs = offs if padded is None else padded.offs
    cases = {
        "output": (lambda: be.grouped_mm_experts(x_rows, w_rows, offs, x.dtype, "output"),
                   lambda: torch._grouped_mm(x, w_hp.transpose(-2, -1), offs=offs), (n, k)),
        "grad_input": (lambda: be.grouped_mm_experts(dy_rows, w_cols, offs, x.dtype, "grad_input"),
                       lambda: torch._grouped_mm(dy, w_hp, offs=offs), (k, n)),
        "grad_weight": (lambda: be.grouped_mm_tokens(dy_cols, x_cols, token_offs, w_hp.dtype, padded is not None),
                        lambda: torch._grouped_mm(dy.t(), x, offs=offs), (n, k)),
    }
    if padded is not None and layer.input_caster.scheme.granularity.transposable:  # tensorwise: ragged too
        _, x_ragged = cast_tokens(layer.input_caster, x, True, None)
        _, dy_ragged = cast_tokens(layer.grad_output_caster, dy, True, None)
        cases["grad_weight ragged"] = (lambda: be.grouped_mm_tokens(dy_ragged, x_ragged, offs, w_hp.dtype, False),
                                       cases["grad_weight"][1], (n, k))
    rows = []
    for gemm, (fp8_fn, bf16_fn, (gn, gk)) in cases.items():
        tflop = 2 * tokens * gn * gk / 1e12
        fp8_ms = time_ms(fp8_fn, repeats)
        try:
            bf16_ms = time_ms(bf16_fn, repeats)
            bf16, ratio = f"{bf16_ms:.3f}ms {tflop / bf16_ms * 1e3:.0f}T", f"{bf16_ms / fp8_ms:.2f}x"
        except (RuntimeError, NotImplementedError) as exc:  # e.g. no torch._grouped_mm on this device
            bf16, ratio = f"- ({type(exc).__name__})", "-"
        rows.append({"recipe": recipe_name, "gemm": f"{gemm} {proj_name}", "shape": f"{tokens}x{gn}x{gk}",
                     "fp8": f"{fp8_ms:.3f}ms {tflop / fp8_ms * 1e3:.0f}T", "bf16": bf16, "fp8/bf16": ratio})
    return rows
