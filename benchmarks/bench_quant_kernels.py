"""Benchmark the FP8 quantization kernels of `kernels/` against a device-to-device copy.

Each kernel is memory bound, so the figure of merit is bandwidth: bytes read + written per call
(high-precision input read once or twice, FP8 output(s) and FP32 scales written) divided by the
median time from `triton.testing.do_bench`. The same run measures `x.clone()` of the input
(read + write of the same bytes) as the practical ceiling, and reports each kernel's bandwidth as a
fraction of it, next to the eager torch reference's time. An `exact` column checks the kernel's
outputs against the reference bit for bit (NaN-free random input). Nothing asserts on time.

    python benchmarks/bench_quant_kernels.py --out bench_quant.json
    python benchmarks/bench_quant_kernels.py --shapes 8192x8192 --dtype fp32 --fp8 e5m2
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import kernels  # noqa: E402
from benchmarks.common import device_name, print_table, write_json  # noqa: E402
from kernels import fallback as reference  # noqa: E402

DEVICE = "cuda"
HP = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
FP8 = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}


def do_bench(fn) -> float:
    """Median milliseconds of fn() (imported lazily: Triton may be absent on CPU machines)."""
    from triton.testing import do_bench as triton_do_bench

    return triton_do_bench(fn, return_mode="median")


def _same(a, b) -> bool:
    if a is None or b is None:
        return a is b
    if a.dtype in FP8.values():
        return torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    return torch.equal(a.view(torch.int32), b.view(torch.int32)) and a.stride() == b.stride()


def _cases(x: torch.Tensor, fp8: torch.dtype):
    """(name, kernel call, reference call, bytes read + written) for one input."""
    n, s = x.numel(), x.element_size()
    scale = torch.tensor([1.5], device=x.device)
    tiles = 4 * n // 128  # fp32 scale_inv per 1x128 tile
    return [
        ("cast_with_amax", lambda m: m.cast_with_amax(x, scale, fp8), n * s + n + 8),
        ("cast_with_amax+t", lambda m: m.cast_with_amax(x, scale, fp8, True), n * s + 2 * n + 8),
        ("current_cast", lambda m: m.current_cast(x, fp8), 2 * n * s + n + 8),
        ("current_cast+t", lambda m: m.current_cast(x, fp8, False, True), 2 * n * s + 2 * n + 8),
        ("quantize_1x128", lambda m: m.quantize_1x128(x, fp8), n * s + n + tiles),
        ("quantize_1x128_t", lambda m: m.quantize_1x128_t(x, fp8), n * s + n + tiles),
        ("quantize_1x128_both", lambda m: m.quantize_1x128_both(x, fp8), n * s + 2 * n + 2 * tiles),
        ("quantize_128x128", lambda m: m.quantize_128x128(x, fp8), n * s + n + 4 * n // 128**2),
        ("quantize_128x128_both", lambda m: m.quantize_128x128_both(x, fp8), n * s + 2 * n + 8 * n // 128**2),
    ]


def _row(shape: str, name: str, nbytes: int, kernel_fn, ref_fn, copy_gbps: float) -> dict:
    got, want = kernel_fn(), ref_fn()
    exact = all(_same(a, b) for a, b in zip(got, want)) if got is not None else True
    ms = do_bench(kernel_fn)
    ref_ms = do_bench(ref_fn)
    gbps = nbytes / ms / 1e6
    return {"shape": shape, "kernel": name, "bytes": nbytes, "ms": ms, "gbps": gbps,
            "vs_copy": gbps / copy_gbps, "ref_ms": ref_ms, "speedup_vs_ref": ref_ms / ms, "exact": exact}


def bench_shape(m: int, k: int, hp: torch.dtype, fp8: torch.dtype) -> list[dict]:
    x = torch.randn(m, k, device=DEVICE, dtype=torch.float32).mul_(3.0).to(hp)
    copy_ms = do_bench(lambda: x.clone())
    copy_gbps = 2 * x.numel() * x.element_size() / copy_ms / 1e6
    shape = f"{m}x{k}"
    rows = [{"shape": shape, "kernel": "copy (x.clone)", "bytes": 2 * x.nbytes, "ms": copy_ms,
             "gbps": copy_gbps, "vs_copy": 1.0, "ref_ms": None, "speedup_vs_ref": None, "exact": None}]
    for name, call, nbytes in _cases(x, fp8):
        rows.append(_row(shape, name, nbytes, lambda c=call: c(kernels), lambda c=call: c(reference),
                         copy_gbps))
    return rows


def bench_delayed(n_tensors: int, history: int) -> dict:
    """One launch updating n_tensors histories of `history` slots (4 B read + 4 B written each)."""
    hist = torch.rand(n_tensors, history, device=DEVICE) * 100
    state = [torch.ones(n_tensors, device=DEVICE) for _ in range(2)]
    fmax = torch.full((n_tensors,), 448.0, device=DEVICE)
    nbytes = 8 * hist.numel() + 16 * n_tensors

    def run(m):
        return lambda: m.delayed_scaling_update(hist, state[0], state[1], fmax, 0.0, "max")

    ms, ref_ms = do_bench(run(kernels)), do_bench(run(reference))
    return {"shape": f"L={n_tensors},H={history}", "kernel": "delayed_scaling_update", "bytes": nbytes,
            "ms": ms, "gbps": nbytes / ms / 1e6, "vs_copy": None, "ref_ms": ref_ms,
            "speedup_vs_ref": ref_ms / ms, "exact": None}


COLUMNS = ["shape", "kernel", "ms", "GB/s", "vs copy", "ref ms", "x ref", "exact"]


def _display(r: dict) -> dict:
    """Row formatted for the table (JSON keeps the raw numbers)."""
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    return {"shape": r["shape"], "kernel": r["kernel"], "ms": fmt(r["ms"], ".4f"),
            "GB/s": fmt(r["gbps"], ".0f"), "vs copy": fmt(r["vs_copy"], ".2f"),
            "ref ms": fmt(r["ref_ms"], ".4f"), "x ref": fmt(r["speedup_vs_ref"], ".1f"),
            "exact": fmt(r["exact"], "")}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="16384x4096,16384x16384,4096x2048", help="MxK,MxK,...")
    p.add_argument("--dtype", choices=sorted(HP), default="bf16", help="input dtype")
    p.add_argument("--fp8", choices=sorted(FP8), default="e4m3", help="output format")
    p.add_argument("--delayed", default="512x1024", help="L x H of the delayed-scaling update")
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("bench_quant_kernels: needs a CUDA GPU (FP8 kernels); nothing measured.", file=sys.stderr)
        return 1
    probe = torch.zeros(1, device=DEVICE)
    backend, reason = kernels.kernel_backend(probe)
    print(f"device: {device_name()} | backend: {backend} ({reason}) | torch {torch.__version__}")
    rows = []
    for shape in args.shapes.split(","):
        m, k = (int(v) for v in shape.lower().split("x"))
        rows += bench_shape(m, k, HP[args.dtype], FP8[args.fp8])
    n_tensors, history = (int(v) for v in args.delayed.lower().split("x"))
    rows.append(bench_delayed(n_tensors, history))
    print_table([_display(r) for r in rows], COLUMNS)
    meta = {"device": device_name(), "backend": backend, "torch": torch.__version__,
            "dtype": args.dtype, "fp8": args.fp8}
    write_json(args.out, {"meta": meta, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
