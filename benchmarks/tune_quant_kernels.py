"""Sweep the launch configurations of the quantization kernels and print each one's bandwidth.

    python benchmarks/tune_quant_kernels.py [--shapes 16384x4096,16384x16384] [--out tune.json]

The kernels read their tile sizes and warp counts from module-level dicts
(`kernels.tensorwise.CAST` / `AMAX`, `kernels.blockwise.TILES`). For every kernel this script tries
each candidate configuration, checks the outputs against the torch reference bit for bit, times it
with `triton.testing.do_bench` (median), and reports bandwidth as a fraction of `x.clone()` measured
in the same run, like bench_quant_kernels.py. The best exact configuration per kernel is printed
last: copy it into the dicts. CUDA only; never asserts on time.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import kernels  # noqa: E402
from benchmarks.bench_quant_kernels import _same, do_bench  # noqa: E402
from benchmarks.common import device_name, print_table, write_json  # noqa: E402
from kernels import fallback as reference  # noqa: E402

FP8 = torch.float8_e4m3fn


def _candidates():
    """(kernel name, which dict to patch, list of configurations, call, bytes per element of bf16)."""
    from kernels import blockwise, tensorwise  # noqa: PLC0415 (CUDA + Triton only)

    casts = [{"BLOCK_M": bm, "BLOCK_K": bk, "num_warps": w}
             for bm, bk in ((32, 128), (64, 128), (128, 128), (64, 64), (128, 64), (64, 256), (32, 256))
             for w in (4, 8)]
    amaxes = [{"BLOCK": b, "programs_per_sm": p, "num_warps": w}
              for b in (2048, 4096, 8192) for p in (2, 4, 8, 16) for w in (4, 8)]
    rows = [{"block": b, "num_warps": w} for b in (16, 32, 64) for w in (2, 4, 8)]
    cols = [{"block": b, "num_warps": w} for b in (16, 32, 64, 128) for w in (2, 4, 8)]
    chunks = [{"chunk": c, "num_warps": w} for c in (32, 64, 128) for w in (4, 8)]
    warps = [{"num_warps": w} for w in (4, 8, 16)]
    scale = torch.tensor([1.5], device="cuda")
    return [
        ("cast_with_amax+t", tensorwise.CAST, casts, lambda m, x: m.cast_with_amax(x, scale, FP8, True), 4),
        ("current_cast amax pass", tensorwise.AMAX, amaxes, lambda m, x: m.current_cast(x, FP8), 5),
        ("quantize_1x128", blockwise.TILES["rows"], rows, lambda m, x: m.quantize_1x128(x, FP8), 3),
        ("quantize_1x128_t", blockwise.TILES["cols"], cols, lambda m, x: m.quantize_1x128_t(x, FP8), 3),
        ("quantize_1x128_both", blockwise.TILES["both"], chunks, lambda m, x: m.quantize_1x128_both(x, FP8), 4),
        ("quantize_128x128", blockwise.TILES["block128"], warps, lambda m, x: m.quantize_128x128(x, FP8), 3),
        ("quantize_128x128_both", blockwise.TILES["block128_both"], warps,
         lambda m, x: m.quantize_128x128_both(x, FP8), 4),
    ]


def sweep(shapes: list[tuple[int, int]], only: list[str] | None = None) -> tuple[list[dict], list[dict]]:
    rows, best = [], []
    inputs = {s: torch.randn(*s, device="cuda").mul_(3.0).to(torch.bfloat16) for s in shapes}
    copy_gbps = {s: 2 * x.nbytes / do_bench(lambda x=x: x.clone()) / 1e6 for s, x in inputs.items()}
    for name, config, candidates, call, bytes_per_elem in _candidates():
        if only and name not in only:
            continue
        default = copy.deepcopy(config)
        wants = {s: call(reference, x) for s, x in inputs.items()}
        scored = []
        for cand in candidates:
            config.clear()
            config.update(cand)
            fractions, exact = [], True
            for s, x in inputs.items():
                try:
                    got = call(kernels, x)
                except Exception as exc:  # a tile the compiler rejects (e.g. out of shared memory)
                    exact, fractions = f"error: {type(exc).__name__}", []
                    break
                exact = exact and all(_same(a, b) for a, b in zip(got, wants[s]))
                ms = do_bench(lambda x=x: call(kernels, x))
                fractions.append(bytes_per_elem * x.numel() / ms / 1e6 / copy_gbps[s])
            worst = min(fractions) if fractions else 0.0
            if exact is True:
                scored.append((worst, cand))
            rows.append({"kernel": name, "config": str(cand), "exact": exact,
                         **{f"{s[0]}x{s[1]}": f"{f:.2f}" for s, f in zip(inputs, fractions)},
                         "worst": f"{worst:.2f}", "default": cand == default})
        config.clear()
        config.update(default)
        top = max(scored, key=lambda sc: sc[0], default=(0.0, default))
        best.append({"kernel": name, "best": str(top[1]), "worst-shape vs copy": f"{top[0]:.2f}",
                     "default": str(default)})
    return rows, best


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="16384x4096,16384x16384")
    parser.add_argument("--only", nargs="*", help="kernel names to sweep (default: all)")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("tune_quant_kernels: needs a CUDA GPU; nothing measured.", file=sys.stderr)
        return 1
    shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",")]
    print(f"device: {device_name()} | torch {torch.__version__} | bf16 -> e4m3, fraction of x.clone() bandwidth")
    rows, best = sweep(shapes, args.only)
    print_table(rows, ["kernel", "config", "exact", *[f"{m}x{k}" for m, k in shapes], "worst", "default"])
    print()
    print_table(best, ["kernel", "best", "worst-shape vs copy", "default"])
    write_json(args.out, {"device": device_name(), "rows": rows, "best": best})
    return 0


if __name__ == "__main__":
    sys.exit(main())
