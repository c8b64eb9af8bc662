"""Host time per call of the FP8 linear's pieces: where small, host-bound layers spend their time.

    python benchmarks/bench_host_overhead.py [--shape 256,256,256] [--recipe hybrid] [--calls 300]

At small shapes the GPU finishes each kernel before the host has issued the next, so a layer's
speed is its host time: Python, argument checks, allocator calls, kernel launches. This script
issues each piece `--calls` times without synchronising and reports the host microseconds per
call (median of 5 repeats), next to BF16 nn.Linear, then a cProfile of fp8 forward+backward run
on one thread (autograd multithreading off, so the backward's Python is profiled too).
CUDA only; prints tables; never asserts on time.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import device_name, host_time_us, print_table  # noqa: E402
from fp8train.numerics import FP8Linear, after_optimizer_step, load_recipe  # noqa: E402
from fp8train.quant.casts import kernels_module  # noqa: E402


def pieces(layer: FP8Linear, base: torch.nn.Linear, x: torch.Tensor, grad: torch.Tensor):
    """(name, callable) for every piece worth timing."""
    caster = layer.input_caster
    x_rows, _ = caster.cast(x, need_cols=False)
    w_rows, _ = layer.fp8_weight()
    scale = torch.ones(1, device=x.device)
    slot = torch.zeros(1, device=x.device)
    empty = torch.empty(1, device=x.device)

    def fp8_fwd_bwd():
        x.grad = None
        layer.weight.grad = None
        layer(x).backward(grad)

    def bf16_fwd_bwd():
        x.grad = None
        base.weight.grad = None
        base(x).backward(grad)

    def recast_weight():
        layer.invalidate_weight_cache()
        layer.fp8_weight()

    from kernels import tensorwise  # noqa: PLC0415 (Triton, CUDA only)
    q, q_t = tensorwise._outputs(x, torch.float8_e4m3fn, True)

    def fp8_fwd_bwd_one_thread():
        torch.autograd.set_multithreading_enabled(False)
        try:
            fp8_fwd_bwd()
        finally:
            torch.autograd.set_multithreading_enabled(True)

    dy_rows, dy_cols = layer.grad_output_caster.cast(grad, need_cols=True)
    _, w_cols = layer.fp8_weight()
    _, x_cols = caster.cast(x, need_cols=True)
    gemm_rows = [
        (f"torch._scaled_mm {gemm}: {a.data.dtype} x {b.data.dtype} -> {dtype}, fast_accum={fast}",
         lambda a=a, b=b, dtype=dtype, fast=fast: torch._scaled_mm(
             a.data, b.data.t(), scale_a=a.scale_inv, scale_b=b.scale_inv, out_dtype=dtype, use_fast_accum=fast))
        for gemm, a, b, dtype, fast in (("output", x_rows, w_rows, torch.bfloat16, True),
                                         ("output", x_rows, w_rows, torch.bfloat16, False),
                                         ("grad_input", dy_rows, w_cols, torch.bfloat16, False),
                                         ("grad_weight", dy_cols, x_cols, torch.bfloat16, False),
                                         ("grad_weight", dy_cols, x_cols, torch.float32, False))]

    rows = gemm_rows + [
        ("torch.empty(1)", lambda: torch.empty(1, device=x.device)),
        ("triton: _amax_kernel launch (5 args)", lambda: tensorwise._amax_kernel[(1,)](x, slot.view(torch.int32), 1, 1, BLOCK=256)),
        ("triton: _cast_kernel launch (18 args)", lambda: tensorwise._launch_cast(
            x, q, q_t, scale, slot.view(torch.int32), empty, torch.float8_e4m3fn, False, with_amax=True,
            write_scale_inv=True)),
        ("tensor.zero_() (one tiny launch)", lambda: empty.zero_()),
        ("kernels.delayed_cast (Triton, checks)", lambda: kernels_module().delayed_cast(x, scale, slot, torch.float8_e4m3fn, True)),
        ("caster.cast(x, need_cols=True)", lambda: caster.cast(x, need_cols=True)),
        ("torch._scaled_mm", lambda: torch._scaled_mm(x_rows.data, w_rows.data.t(), scale_a=x_rows.scale_inv,
                                                      scale_b=w_rows.scale_inv, out_dtype=torch.bfloat16)),
        ("backend.mm (output GEMM)", lambda: layer.backend.mm(x_rows, w_rows, torch.bfloat16, "output")),
        ("weight re-cast (invalidate + fp8_weight)", recast_weight),
        ("after_optimizer_step(layer)", lambda: after_optimizer_step(layer)),
        ("fp8 forward, no grad", lambda: torch.no_grad()(layer)(x)),
        ("fp8 forward+backward", fp8_fwd_bwd),
        ("fp8 forward+backward, autograd on this thread", fp8_fwd_bwd_one_thread),
        ("bf16 nn.Linear forward+backward", bf16_fwd_bwd),
    ]
    return rows, fp8_fwd_bwd


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="256,256,256")
    parser.add_argument("--recipe", default="hybrid")
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--profile-rows", type=int, default=30)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() or kernels_module() is None:
        sys.exit("bench_host_overhead needs a CUDA GPU and the Triton kernels")
    tokens, k, n = (int(v) for v in args.shape.split(","))
    base = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
    layer = FP8Linear.from_linear(torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16),
                                  load_recipe(args.recipe), backend="scaled_mm")
    after_optimizer_step(layer)
    x = torch.randn(tokens, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(tokens, n, device="cuda", dtype=torch.bfloat16)
    rows, fp8_fwd_bwd = pieces(layer, base, x, grad)
    rows = [{"piece": name, "host_us": f"{host_time_us(fn, args.calls):.1f}"} for name, fn in rows]
    print(f"\nhost microseconds per call, {args.recipe}, shape {args.shape}, on {device_name()}")
    print_table(rows, ["piece", "host_us"])

    torch.autograd.set_multithreading_enabled(False)  # the backward's Python runs on this thread
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(200):
        fp8_fwd_bwd()
        after_optimizer_step(layer)
    profiler.disable()
    torch.cuda.synchronize()
    stream = io.StringIO()
    pstats.Stats(profiler, stream=stream).sort_stats("tottime").print_stats(args.profile_rows)
    print("\ncProfile of 200 x (fp8 forward+backward + after_optimizer_step), by own time:")
    print(stream.getvalue())


if __name__ == "__main__":
    main()
