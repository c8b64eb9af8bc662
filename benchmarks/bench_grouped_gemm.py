"""Grouped MoE expert GEMMs: BF16 vs torch FP8 vs our Triton grouped FP8 kernels, per GEMM.

    python benchmarks/bench_grouped_gemm.py [--layers large small] [--out results.json]
    python benchmarks/bench_grouped_gemm.py --sweep [--layers small]     # try SWEEP configs per GEMM

For each of the six grouped GEMMs of an MoE layer (benchmarks/grouped_gemm_cases.py) it times, in one
run on one card (CUDA-event medians):
    bf16        torch._grouped_mm on the BF16 operands (the baseline)
    torch fp8   torch._scaled_grouped_mm, E4M3 x E4M3 (it takes no other pair), groups padded to 16
    tw e4m3     our kernel, tensorwise, A E4M3 x B E4M3; fast accumulation for `output`, promoted
                every 128 for the two gradient GEMMs (as fp8train's layer accumulates)
    tw e5m2     the same with A in E5M2 (hybrid gradients; v3_fp8 activations)
    tw fast     tensorwise E4M3 with fast accumulation everywhere (the ceiling of promotion's cost)
    tw a128     grad_weight only: tw e5m2 with every expert's tokens padded to 128 (groups_aligned=True:
                the flat tile/chunk loop of kernels/grouped_gemm_flat.py instead of one pipeline per tile)
    blockwise   our kernel, DeepSeek-V3 1x128 / 128x128 scales, promotion every 128
Each cell: milliseconds and useful TFLOP/s; `sqnr` is the FP8 output's SQNR (dB) against the BF16
output (a broken kernel shows ~0 dB). It also prints the FLOP waste of tile padding. CUDA only;
never asserts on time.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import kernels  # noqa: E402
from benchmarks.common import device_name, print_table, time_ms, write_json  # noqa: E402
from benchmarks.grouped_gemm_cases import (E4M3, E5M2, LAYERS, ROLES, flop_waste, layout, route_sizes,  # noqa: E402
                                           scatter_rows, tensorwise)
from kernels.grouped_gemm_configs import CONFIGS, Form, Scaling, TileConfig, pick_config  # noqa: E402

VARIANTS = ["bf16", "torch fp8", "tw e4m3", "tw e5m2", "tw fast", "tw a128", "blockwise"]
SWEEP = [  # candidate configs for --sweep (blockwise skips bn > 128); flat: fused tile/K loops
    TileConfig(128, 256, num_stages=3), TileConfig(128, 256, num_stages=3, flatten=True),
    TileConfig(128, 256, num_stages=4, flatten=True), TileConfig(128, 256, num_stages=3, flatten=True, group_m=4),
    TileConfig(128, 256, num_stages=3, flatten=True, group_m=16),
    TileConfig(128, 128, num_stages=4), TileConfig(128, 128, num_stages=4, flatten=True),
    TileConfig(128, 128, num_stages=5, flatten=True),
    TileConfig(64, 256, num_stages=4, flatten=True), TileConfig(64, 256, num_stages=5, flatten=True),
    TileConfig(64, 128, num_warps=4, num_stages=4, programs_per_sm=2, flatten=True),
    TileConfig(64, 128, num_warps=4, num_stages=3, programs_per_sm=3, flatten=True),
    TileConfig(128, 128, num_stages=4, use_tma=False), TileConfig(128, 256, num_stages=3, tail_k=64),
    # promoted accumulation (grad_input, grad_weight) keeps two FP32 tiles: more 128 x 128 variants
    TileConfig(128, 128, num_stages=3, flatten=True), TileConfig(128, 128, num_stages=6, flatten=True),
    TileConfig(128, 128, num_stages=4, flatten=True, group_m=4),
    TileConfig(128, 128, num_stages=4, flatten=True, group_m=16),
    TileConfig(128, 128, num_stages=3, flatten=True, programs_per_sm=2),
    TileConfig(128, 128, num_stages=5), TileConfig(128, 128, num_stages=4, group_m=16),
    TileConfig(128, 128, num_warps=4, num_stages=4, flatten=True),
]


def _fp8_operands(x_hp: torch.Tensor) -> dict:
    """Tensorwise E4M3 and E5M2 copies of x and of x^T (the tokens form's operands)."""
    out = {}
    for tag, dtype in (("4", E4M3), ("5", E5M2)):
        q, s = tensorwise(x_hp, dtype)
        out[tag] = (q, s)
        out[f"{tag}t"] = (q.t().contiguous(), s)
    return out


def build_data(layer, sizes: list[int], device: str) -> dict:
    """Every operand of every variant, for the two activation shapes X [T, dim] and H [T, hidden]."""
    gen = torch.Generator(device=device).manual_seed(1)
    ragged, pad16, pad128 = (layout(sizes, align, device) for align in (1, 16, 128))
    d = {"ragged": ragged, "pad16": pad16, "pad128": pad128}
    for name, width in (("x", layer.dim), ("h", layer.hidden)):
        hp = torch.randn(ragged.total, width, device=device, generator=gen, dtype=torch.bfloat16)
        d[name] = {"hp": hp, **_fp8_operands(hp)}
        q16 = scatter_rows(d[name]["4"][0].view(torch.uint8), pad16).view(E4M3)
        d[name]["pad16"], d[name]["pad16t"] = q16, q16.t().contiguous()
        d[name]["block"] = kernels.quantize_1x128(hp, E4M3)
        d[name]["block_t128"] = kernels.quantize_1x128_t(scatter_rows(hp, pad128), E4M3)
        for tag, dtype in (("4", E4M3), ("5", E5M2)):  # tensorwise, groups padded to 128 (same scale)
            padded = scatter_rows(d[name][tag][0].view(torch.uint8), pad128).view(dtype)
            d[name][f"{tag}t128"] = (padded.t().contiguous(), d[name][tag][1])
    for name, (n, k) in (("w1", (layer.hidden, layer.dim)), ("w2", (layer.dim, layer.hidden))):
        hp = torch.randn(layer.experts, n, k, device=device, generator=gen, dtype=torch.bfloat16) * 0.02
        q, s = tensorwise(hp, E4M3)
        bq, bs = kernels.quantize_128x128(hp.reshape(-1, k), E4M3)
        d[name] = {"hp": hp, "4": (q, s), "block": (bq.view(hp.shape), bs.view(layer.experts, n // 128, k // 128))}
    return d


def _experts_calls(d: dict, a: str, w: str, fast: bool) -> dict:
    A, W, offs = d[a], d[w], d["ragged"].offs
    E, N, _ = W["hp"].shape
    sa16 = A["4"][1].expand(d["pad16"].total).contiguous()
    sb16 = W["4"][1].expand(E, N).contiguous()
    bf16 = torch.bfloat16
    return {
        "bf16": lambda: torch._grouped_mm(A["hp"], W["hp"].transpose(-2, -1), offs=offs),
        "torch fp8": lambda: torch._scaled_grouped_mm(A["pad16"], W["4"][0].transpose(-2, -1), sa16, sb16,
                                                      offs=d["pad16"].offs, out_dtype=bf16, use_fast_accum=fast),
        "tw e4m3": lambda: kernels.grouped_mm_experts_tensorwise(A["4"][0], W["4"][0], A["4"][1], W["4"][1], offs,
                                                                 bf16, fast),
        "tw e5m2": lambda: kernels.grouped_mm_experts_tensorwise(A["5"][0], W["4"][0], A["5"][1], W["4"][1], offs,
                                                                 bf16, fast),
        "tw fast": lambda: kernels.grouped_mm_experts_tensorwise(A["4"][0], W["4"][0], A["4"][1], W["4"][1], offs,
                                                                 bf16, True),
        "blockwise": lambda: kernels.grouped_mm_experts_blockwise(A["block"][0], W["block"][0], A["block"][1],
                                                                  W["block"][1], offs, bf16),
    }


def _tokens_calls(d: dict, a: str, b: str) -> dict:
    A, B, E = d[a], d[b], d["ragged"].offs.shape[0]
    M, N = A["hp"].shape[1], B["hp"].shape[1]
    sa = A["4"][1].expand(E * M).contiguous()
    sb = B["4"][1].expand(E * N).contiguous()
    offs, bf16 = d["ragged"].offs, torch.bfloat16
    return {
        "bf16": lambda: torch._grouped_mm(A["hp"].t(), B["hp"], offs=offs),
        "torch fp8": lambda: torch._scaled_grouped_mm(A["pad16t"], B["pad16t"].t(), sa, sb, offs=d["pad16"].offs,
                                                      out_dtype=bf16),
        "tw e4m3": lambda: kernels.grouped_mm_tokens_tensorwise(A["4t"][0], B["4t"][0], A["4t"][1], B["4t"][1], offs,
                                                                bf16),
        "tw e5m2": lambda: kernels.grouped_mm_tokens_tensorwise(A["5t"][0], B["4t"][0], A["5t"][1], B["4t"][1], offs,
                                                                bf16),
        "tw fast": lambda: kernels.grouped_mm_tokens_tensorwise(A["4t"][0], B["4t"][0], A["4t"][1], B["4t"][1], offs,
                                                                bf16, True),
        "tw a128": lambda: kernels.grouped_mm_tokens_tensorwise(A["5t128"][0], B["4t128"][0], A["5t128"][1],
                                                                B["4t128"][1], d["pad128"].offs, bf16, False, True),
        "blockwise": lambda: kernels.grouped_mm_tokens_blockwise(A["block_t128"][0], B["block_t128"][0],
                                                                 A["block_t128"][1], B["block_t128"][1],
                                                                 d["pad128"].offs, bf16),
    }


def gemm_calls(role: str, proj: str, d: dict) -> tuple[dict, Form, tuple[int, int, int]]:
    """{variant: callable}, the form, and (T_real, N, K) or (T_real, M, N) for the FLOP count."""
    T = d["ragged"].total
    if role == "grad_weight":
        a, b = ("h", "x") if proj == "gate|up" else ("x", "h")
        return _tokens_calls(d, a, b), Form.TOKENS, (T, d[a]["hp"].shape[1], d[b]["hp"].shape[1])
    a, w = {("output", "gate|up"): ("x", "w1"), ("output", "down"): ("h", "w2"),
            ("grad_input", "gate|up"): ("h", "w2"), ("grad_input", "down"): ("x", "w1")}[(role, proj)]
    n, k = d[w]["hp"].shape[1:]
    return _experts_calls(d, a, w, fast=role == "output"), Form.EXPERTS, (T, n, k)


def sqnr_db(got: torch.Tensor, want: torch.Tensor) -> float:
    err = (got.float() - want.float()).norm()
    return float(20 * torch.log10(want.float().norm() / err.clamp_min(1e-30)))


def _real(out: torch.Tensor, variant: str, form: Form, d: dict) -> torch.Tensor:
    """The real rows of an experts-form output (torch fp8 runs on the 16-padded layout)."""
    return out.index_select(0, d["pad16"].dest) if form is Form.EXPERTS and variant == "torch fp8" else out


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _bf16_output(calls: dict, form: Form, d: dict, role: str, proj: str) -> torch.Tensor:
    """The baseline's output, or (where torch._grouped_mm cannot run, e.g. on the CPU) a per-expert loop."""
    try:
        return calls["bf16"]()
    except (RuntimeError, NotImplementedError):
        _sync()
    bounds = d["ragged"].offs.tolist()
    if form is Form.TOKENS:
        a, b = ("h", "x") if proj == "gate|up" else ("x", "h")
        return torch.stack([d[a]["hp"][s:e].float().t() @ d[b]["hp"][s:e].float()
                            for s, e in zip([0, *bounds[:-1]], bounds)]).bfloat16()
    a, w = {("output", "gate|up"): ("x", "w1"), ("output", "down"): ("h", "w2"),
            ("grad_input", "gate|up"): ("h", "w2"), ("grad_input", "down"): ("x", "w1")}[(role, proj)]
    return torch.cat([d[a]["hp"][s:e].float() @ d[w]["hp"][i].float().t()
                      for i, (s, e) in enumerate(zip([0, *bounds[:-1]], bounds))]).bfloat16()


def time_row(role, proj, d, repeats: int) -> dict:
    calls, form, (t, n, k) = gemm_calls(role, proj, d)
    tflop = 2 * t * n * k / 1e12
    row = {"gemm": f"{role} {proj}", "shape": f"{t}x{n}x{k}"}
    want = _bf16_output(calls, form, d, role, proj)
    for name in VARIANTS:
        if name not in calls:
            row[name] = "-"
            continue
        try:
            got = _real(calls[name](), name, form, d)
            ms = time_ms(calls[name], repeats)
            quality = "" if name == "bf16" else f" {sqnr_db(got, want):.0f}dB"
            row[name] = f"{ms:.3f}ms {tflop / ms * 1e3:.0f}T{quality}"
            row[f"_{name}_ms"] = ms
        except Exception as exc:  # one failing variant must not lose the table
            _sync()
            row[name] = f"error {type(exc).__name__}: {str(exc).splitlines()[0][:50]}"
    return row


def waste_rows(layer, sizes) -> list[dict]:
    """Extra FLOPs of tile padding for 128- and 64-row expert tiles; `table` marks what CONFIGS uses
    for this layer (its shape class follows the mean rows per expert)."""
    used = pick_config(Form.EXPERTS, Scaling.TENSORWISE, layer.hidden, layer.rows / layer.experts, True, False).bm
    rows = []
    for bm in (128, 64):
        w = flop_waste(sizes, bm=bm, bk=128, tail=32)
        rows.append({"layer": layer.name, "expert tile rows": f"{bm}{' (table)' if bm == used else ''}",
                     **{k: f"{v:.2f}%" for k, v in w.items()}})
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", nargs="*", default=["large", "small"], choices=list(LAYERS))
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--sweep", action="store_true", help="time SWEEP configs per GEMM instead")
    parser.add_argument("--modes", help="--sweep only these modes, comma-separated (e.g. 'tw e5m2,tw a128')")
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU check of this script: the tiny layer through the Triton interpreter")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    device = "cuda"
    if args.dry_run:
        if os.environ.get("TRITON_INTERPRET") != "1":
            sys.exit("--dry-run runs the kernels in the interpreter: set TRITON_INTERPRET=1")
        device, args.layers, args.repeats = "cpu", ["tiny"], 1
    elif not torch.cuda.is_available():
        sys.exit("bench_grouped_gemm needs a CUDA GPU with FP8 (H100); --dry-run checks it on the CPU")
    print(f"device: {device_name()}, torch {torch.__version__}")
    payload = {"device": device_name(), "layers": {}}
    for name in args.layers:
        layer = LAYERS[name]
        sizes = route_sizes(layer, device)
        print(f"\n== {name}: {layer}; rows per expert min {min(sizes)} max {max(sizes)}", flush=True)
        print_table(waste_rows(layer, sizes), ["layer", "expert tile rows", "experts", "tokens", "tokens_blockwise",
                                               "torch_pad16"])
        d = build_data(layer, sizes, device)
        if args.sweep:
            from benchmarks.sweep_grouped_gemm import sweep_layer  # noqa: PLC0415

            modes = args.modes.split(",") if args.modes else None
            payload["layers"][name] = sweep_layer(d, args.repeats, modes)
        else:
            rows = [time_row(role, proj, d, args.repeats) for role, proj in ROLES]
            print(f"\n{name} layer, ms / useful TFLOP/s / SQNR vs BF16, on {device_name()}")
            print_table(rows, ["gemm", "shape", *VARIANTS])
            payload["layers"][name] = rows
        del d
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    print("\nconfigs:", {f"{f.value}/{s.value}/{c.value}/fast={fast}": str(cfg)
                         for (f, s, c, fast), cfg in CONFIGS.items()})
    write_json(args.out, payload)


if __name__ == "__main__":
    main()
