"""Which grouped FP8 GEMM variants run on this GPU: every variant in its own process.

A Triton kernel that dies with an illegal instruction poisons the CUDA context of its process, so
one bad variant would fail every test after it. Here each (case, config override) runs alone, the
processes spread over the visible GPUs, and the table says which variants are correct (relative
error vs the per-expert FP32 reference) and how long each took (median of 5 launches).

    python scripts/gpu/grouped_probe.py            # all variants, one process per variant
    python scripts/gpu/grouped_probe.py --gpus 1   # on one GPU only
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from gpu_pool import run_on_gpus  # scripts/gpu/, this script's folder

# (case, overrides): case names map to the GPU test's inputs (tests/gpu/test_grouped_fp8_kernels.py)
VARIANTS = [
    ("tokens_ragged_promoted_e5m2", {}),
    ("tokens_ragged_promoted_e5m2", {"use_tma": False}),
    ("tokens_ragged_promoted_e5m2", {"flatten": False}),
    ("tokens_ragged_fast_e4m3", {}),
    ("tokens_ragged_fast_e4m3", {"use_tma": False}),
    ("tokens_aligned_promoted_e5m2", {}),
    ("tokens_aligned_promoted_e5m2", {"use_tma": False}),
    ("tokens_aligned_promoted_e5m2", {"flatten": False}),
    ("tokens_blockwise", {}),
    ("tokens_blockwise", {"use_tma": False}),
    ("tokens_blockwise", {"flatten": False}),
    ("experts_fast_large_fp32", {}),
    ("experts_promoted_large_e5m2", {}),
    ("experts_blockwise_large", {}),
]


def run_case(case: str, overrides: dict) -> dict:
    import torch

    import kernels
    from kernels import grouped_gemm_reference as reference
    from kernels.grouped_gemm_configs import Form, Scaling, fit_smem, pick_config, with_overrides
    from tests.gpu import test_grouped_fp8_kernels as t

    torch.backends.cuda.matmul.allow_tf32 = False
    f32 = torch.float32
    sa1, sb1 = torch.tensor([0.01], device="cuda"), torch.tensor([0.03], device="cuda")

    def config(form, scaling, n, rows, fast):
        return fit_smem(with_overrides(pick_config(form, scaling, n, rows, fast, False, 4), **overrides), 4)

    if case.startswith("tokens_ragged") or case.startswith("tokens_aligned"):
        dtype = t.E5M2 if "e5m2" in case else t.E4M3
        fast, aligned = "fast" in case, "aligned" in case
        a, b, offs = t.tokens_case(t.SMALL, 1408, 2048, dtype, align=128 if aligned else 1)
        cfg = config(Form.TOKENS, Scaling.TENSORWISE, 2048, a.shape[1], fast)
        call = lambda: kernels.grouped_mm_tokens_tensorwise(a, b, sa1, sb1, offs, f32, fast, aligned, config=cfg)  # noqa: E731
        want = lambda: reference.tokens_tensorwise(a, b, sa1, sb1, offs, f32)  # noqa: E731
        bound = 2e-2 if fast else 1e-3
    elif case == "tokens_blockwise":
        a, b, offs = t.tokens_case(t.SMALL, 1408, 2048, t.E4M3, align=128)
        n_tok = a.shape[1] // 128 * 128
        a, b = a[:, :n_tok], b[:, :n_tok]
        sa = torch.rand(n_tok // 128, 1408, device="cuda").t() * 0.01 + 0.001
        sb = torch.rand(n_tok // 128, 2048, device="cuda").t() * 0.01 + 0.001
        cfg = config(Form.TOKENS, Scaling.BLOCKWISE, 2048, n_tok, False)
        call = lambda: kernels.grouped_mm_tokens_blockwise(a, b, sa, sb, offs, f32, config=cfg)  # noqa: E731
        want = lambda: reference.tokens_blockwise(a, b, sa, sb, offs, f32)  # noqa: E731
        bound = 1e-3
    elif case.startswith("experts"):
        blockwise, fast = "blockwise" in case, "fast" in case
        dtype = t.E5M2 if "e5m2" in case else t.E4M3
        a, b, offs = t.experts_case(t.LARGE, 2048, 7168, dtype)
        rows = a.shape[0] / 32
        if blockwise:
            sa = torch.rand(7168 // 128, a.shape[0], device="cuda").t() * 0.01 + 0.001
            sb = torch.rand(32, 2048 // 128, 7168 // 128, device="cuda") * 0.01 + 0.001
            cfg = config(Form.EXPERTS, Scaling.BLOCKWISE, 2048, rows, False)
            call = lambda: kernels.grouped_mm_experts_blockwise(a, b, sa, sb, offs, f32, config=cfg)  # noqa: E731
            want = lambda: reference.experts_blockwise(a, b, sa, sb, offs, f32)  # noqa: E731
        else:
            sb = torch.rand(32, device="cuda") * 0.01 + 0.001
            cfg = config(Form.EXPERTS, Scaling.TENSORWISE, 2048, rows, fast)
            call = lambda: kernels.grouped_mm_experts_tensorwise(a, b, sa1, sb, offs, f32, fast, config=cfg)  # noqa: E731
            want = lambda: reference.experts_tensorwise(a, b, sa1, sb, offs, f32)  # noqa: E731
        bound = 2e-2 if fast else 1e-3
    else:
        raise ValueError(case)
    got = call()
    torch.cuda.synchronize()
    ref = want()
    err = float((got.float() - ref.float()).norm() / ref.float().norm())
    times = []
    for _ in range(5):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        stop.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(stop))
    ok = bool(torch.isfinite(got).all()) and err < bound
    return {"ok": ok, "rel_err": err, "bound": bound, "ms": sorted(times)[2], "config": str(cfg)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--gpus", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.worker:
        case, overrides = json.loads(args.worker)
        print("RESULT " + json.dumps(run_case(case, overrides)))
        return
    import torch

    gpus = args.gpus or torch.cuda.device_count()
    rows = []
    for run in run_on_gpus(VARIANTS, lambda v: [sys.executable, __file__, "--worker", json.dumps(v)], gpus, 120,
                           Path("/tmp/grouped_probe_logs")):
        text = run.text
        line = next((ln for ln in text.splitlines() if ln.startswith("RESULT ")), None)
        result = json.loads(line[7:]) if line else {"ok": False, "error": (text.strip().splitlines() or ["?"])[-1][:150]}
        rows.append({"case": run.job[0], "overrides": run.job[1], **result})
    print("| case | overrides | ok | rel. error | ms | config / error |\n|---|---|---|---|---|---|")
    for r in rows:
        detail = r.get("config") or r.get("error", "")
        err = f"{r['rel_err']:.1e}" if "rel_err" in r else "-"
        ms = f"{r['ms']:.3f}" if "ms" in r else "-"
        print(f"| {r['case']} | {json.dumps(r['overrides'])} | {r['ok']} | {err} | {ms} | {detail} |")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
