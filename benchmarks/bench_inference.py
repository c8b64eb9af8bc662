"""Quantized-inference benchmark: low-bit GEMMs, KV-cache decode attention, decode tokens/s.

    python benchmarks/bench_inference.py --out $OUT            # on one H100 (~3 minutes)
    TRITON_INTERPRET=1 python benchmarks/bench_inference.py --dry-run   # logic check on a CPU
    python benchmarks/bench_inference.py --parts gemm --ms 1,16 --variants W4A16,W8A16 \
        --shapes "1b qkv,1b gate_up,8b up,8b down" --out $OUT       # decode GEMV vs GEMM kernel vs BF16

1. GEMMs out[M, N] = x[M, K] W^T for the 1B model's projections (fused qkv, o, fused gate_up,
   down) and the 8B-like 4096->14336, 14336->4096, at M = 1, 16, 128, 4096, vs BF16 cuBLAS
   (F.linear) in the same run. W4A16 (uint4 asym g128) and W8A16 (int8 per row) try several kernel
   configurations (and, for M >= 128, dequantize + cuBLAS); each is first checked against the
   reference (dequantize + FP32 matmul) and only verified ones are timed. W8A8 INT8 (Triton
   IMMA GEMM with fused scaling) and FP8 (torch._scaled_mm, row-wise) include the per-token
   activation quantization. At M <= 16 the weight-only columns also try the decode GEMV
   (kernels/lowbit_gemv.py) and show the best of each kernel ("W4A16 gemm", "W4A16 gemv").
   The fastest verified configuration per shape goes to tuned.json (kernels.lowbit_ops.load_tuned)
   and is used by part 3.
2. Decode attention at 32k context (one query token per row) for every cache mode, our Triton kernel
   reading the cache directly; BF16 = the same kernel on a BF16 cache; SDPA = torch's
   scaled_dot_product_attention on the BF16 cache for reference.
3. Decode tokens/s of the 1B model (random weights, bf16, CUDA-graphed DecodePlan step), batch 1
   and 16, BF16 weights + BF16 cache vs W4/W8 weights + INT8/INT4 caches.

Timing (benchmarks/inference_timing.py): CUDA graphs of back-to-back calls over enough operand
copies to miss L2; medians. Speed-ups are BF16 time / variant time. Nothing asserts on time.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.common import device_name, print_table  # noqa: E402
from benchmarks.inference_timing import best_of, copies_for, time_calls_ms  # noqa: E402
from fp8train.inference.lowbit_matmul import LowBitWeight, lowbit_linear, quantize_weights  # noqa: E402
from fp8train.quant.spec import QuantSpec  # noqa: E402
from kernels import lowbit_ops  # noqa: E402

W4 = QuantSpec("uint4", "tile", 128, symmetric=False)
W8 = QuantSpec("int8", "row")
A8 = QuantSpec("int8", "row")
FP8 = QuantSpec("e4m3", "row")
SHAPES_1B = [("1b qkv", 2048, 6144), ("1b o", 2048, 2048), ("1b gate_up", 2048, 11264), ("1b down", 5632, 2048)]
SHAPES_8B = [("8b up", 4096, 14336), ("8b down", 14336, 4096)]


def _verified(x: torch.Tensor, w: LowBitWeight, run, reference: torch.Tensor, tolerance: float = 1e-2) -> None:
    """Relative error vs dequantize + FP32 matmul; the tolerance covers bf16 output rounding (and,
    for W8A8, the activations' own quantization: int8 ~1%, e4m3 ~3%)."""
    out = run()
    err = ((out.float() - reference).norm() / reference.norm()).item()
    if not err < tolerance:
        raise RuntimeError(f"wrong result (relative error {err:.3g})")


def _weight_only_candidates(x, copies: list[LowBitWeight], kind: str, reference, device) -> tuple[dict, dict]:
    """({label: timed run}, {label: configuration}): the GEMM kernel's first --max-configs
    configurations, for M <= 16 also the decode GEMV's first --max-gemv (labels "fused ..." / "gemv ...")."""
    m, k = x.shape
    w = copies[0]
    cands, configs = {}, {}
    every = lowbit_ops.candidate_configs(m, w.n, k, w.group, device, w.bits)
    gemm = [c for c in every if isinstance(c, lowbit_ops.GemmConfig)][:ARGS.max_configs]
    for cfg in gemm + [c for c in every if isinstance(c, lowbit_ops.GemvConfig)][:ARGS.max_gemv]:
        def run(cfg=cfg, w=w):
            return lowbit_ops.lowbit_matmul(x, w.codes, w.scale, w.zero, w.bits, w.group, w.k, config=cfg)

        def timed(cfg=cfg, run=run):
            _verified(x, w, run, reference)
            return time_calls_ms([lambda c=c: lowbit_ops.lowbit_matmul(x, c.codes, c.scale, c.zero, c.bits, c.group,
                                                                      c.k, config=cfg) for c in copies])
        label = f"{'fused' if isinstance(cfg, lowbit_ops.GemmConfig) else 'gemv'} {cfg.name()}"
        cands[label], configs[label] = timed, cfg
    if m >= 128:
        def deq(c):
            return F.linear(x, lowbit_ops.dequantize_weight(c.codes, c.scale, c.zero, c.bits, c.group, c.k, x.dtype))

        def timed_deq():
            _verified(x, w, lambda: deq(w), reference)
            return time_calls_ms([lambda c=c: deq(c) for c in copies])
        cands["dequant+cublas"] = timed_deq
    return cands, configs


def _family_best(notes: dict, prefix: str, base: float) -> str:
    """The fastest verified candidate whose label starts with prefix, as "speed-up (config)"."""
    timed = {name: float(note.split()[0]) for name, note in notes.items()
             if name.startswith(prefix) and note.endswith(" us")}
    if not timed:
        return "none verified"
    name = min(timed, key=timed.get)
    return f"{base * 1e3 / timed[name]:.2f}x ({timed[name]:.1f} us {name.split()[-1]})"


def gemm_rows(shapes, ms, device) -> list[dict]:
    rows = []
    for name, k, n in shapes:
        w_hp = torch.randn(n, k, device=device) * 0.02
        dense = [w_hp.bfloat16()] + [torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02
                                     for _ in range(copies_for(2 * n * k) - 1)]
        for m in ms:
            x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
            base = time_calls_ms([lambda d=d: F.linear(x, d) for d in dense])
            row = {"shape": f"{name} {k}->{n}", "M": m, "bf16 us": f"{base * 1e3:.1f}"}
            for label, spec, act in (("W4A16", W4, None), ("W8A16", W8, None), ("W8A8 int8", W8, A8),
                                     ("W8A8 fp8", FP8, FP8)):
                if label not in ARGS.variants:
                    continue
                if act is not None and m < 128:
                    row[label] = "-"
                    continue
                row[label] = _variant(label, spec, act, x, w_hp, base, device, row)
            rows.append(row)
            print(row, flush=True)
        del dense
    return rows


def _variant(label, spec, act, x, w_hp, base, device, row: dict) -> str:
    """The variant's best speed-up over BF16; for weight-only M <= 16 also the best of each kernel
    (row["<label> gemm"], row["<label> gemv"])."""
    m, k = x.shape
    n = w_hp.shape[0]
    quantized = quantize_weights([w_hp], spec)[0]
    copies = [quantized] + quantize_weights([torch.randn_like(w_hp) * 0.02 for _ in range(
        copies_for(quantized.nbytes) - 1)], spec)
    reference = x.float() @ quantized.qt.dequantize().t()
    if act is None:
        kind = quantized.kind
        cands, configs = _weight_only_candidates(x, copies, kind, reference, device)
        best, ms, notes = best_of(cands)
        if m <= 16:
            row[f"{label} gemm"] = _family_best(notes, "fused", base)
            row[f"{label} gemv"] = _family_best(notes, "gemv", base)
        if best is not None:
            key = lowbit_ops.shape_key(kind, m, n, k)
            if best in configs:
                lowbit_ops.TUNED[key] = configs[best]
                lowbit_ops.STRATEGY[key] = "fused"
            else:
                lowbit_ops.STRATEGY[key] = "dequant"
    else:
        key = lowbit_ops.shape_key("w8a8_int8", m, n, k)

        def timed(strategy):
            lowbit_ops.STRATEGY[key] = strategy
            _verified(x, quantized, lambda: lowbit_linear(x, quantized, act), reference,
                      0.03 if act.format == "int8" else 0.08)
            return time_calls_ms([lambda c=c: lowbit_linear(x, c, act) for c in copies])
        strategies = ("triton", "int_mm") if act.format == "int8" else ("scaled_mm",)
        best, ms, notes = best_of({name: lambda name=name: timed(name) for name in strategies})
        if act.format == "int8" and best is not None:
            lowbit_ops.STRATEGY[key] = best
    DETAILS.append({"variant": label, "M": m, "N": n, "K": k, "best": best, "candidates": notes})
    if best is None:
        return "failed: " + next(iter(notes.values()), "")[:40]
    return f"{base / ms:.2f}x ({ms * 1e3:.1f} us)"


def kv_rows(context: int, batches, device) -> list[dict]:
    from fp8train.inference import kv_reference
    from fp8train.inference.kv_cache import StaticKVCache
    from fp8train.inference.kv_modes import kv_quantization

    rows = []
    for label, hq, h in (("1b 16/16 heads", 16, 16), ("8b-like 32/8 heads", 32, 8)):
        for batch in batches:
            # inputs drawn on the CPU: a candidate whose graph capture failed can leave the CUDA
            # generator believing it is still capturing ("Offset increment outside graph capture")
            q = torch.randn(batch, hq, 128, dtype=torch.bfloat16).to(device)
            start = torch.zeros(batch, dtype=torch.long, device=device)
            slot = torch.tensor(context - 1, device=device)
            row = {"heads q/kv": label, "batch": batch, "context": context}
            base = None
            for mode in ("bf16", "fp8", "int8", "int4", "int4_hadamard", "kivi", "int4_centered"):
                cache = StaticKVCache(kv_quantization(mode), 1, batch, h, context, 128, device=device)
                k = torch.randn(batch, h, context, 128, dtype=torch.bfloat16).to(device)
                cache.write(0, k, torch.randn(k.shape, dtype=k.dtype).to(device), 0)
                if mode == "bf16":
                    kk, vv = cache.layer(0).k_codes, cache.layer(0).v_codes
                    sdpa = time_calls_ms(
                        [lambda: F.scaled_dot_product_attention(q[:, :, None], kk, vv, enable_gqa=True)], calls=8)
                    row["sdpa bf16 us"] = f"{sdpa * 1e3:.1f}"
                del k
                reference = kv_reference.attention(q, *cache.read(0, context), start)
                cands = {}
                for splits in (None, 2 * lowbit_default_splits(batch * h, context)):
                    for block_n, warps in ((64, 4), (128, 8), (32, 4)):
                        opts = dict(splits=splits, block_n=block_n, num_warps=warps)

                        def timed(opts=opts, cache=cache):
                            got = cache.attend(0, q, slot, start, **opts)
                            if not torch.allclose(got.float(), reference, atol=3e-2, rtol=3e-2):
                                raise RuntimeError("wrong result")
                            return time_calls_ms([lambda: cache.attend(0, q, slot, start, **opts)], calls=8)
                        cands[f"s{splits}b{block_n}w{warps}"] = timed
                best, ms, notes = best_of(cands)
                DETAILS.append({"kv": mode, "heads": label, "batch": batch, "best": best, "candidates": notes})
                gbps = cache.nbytes / ms / 1e6
                base = ms if mode == "bf16" else base
                row[mode] = (f"{base / ms:.2f}x ({ms * 1e3:.0f} us, {gbps:.0f} GB/s)" if best else "failed")
                del cache
                torch.cuda.empty_cache() if torch.cuda.is_available() else None
            rows.append(row)
            print(row, flush=True)
    return rows


def lowbit_default_splits(programs: int, context: int) -> int:
    from kernels.kv_ops import default_splits

    return default_splits(programs, context, 64)


def decode_rows(size: str, batches, prompt: int, steps: int, device) -> list[dict]:
    from fp8train.inference.cuda_graph import GraphedStep
    from fp8train.inference.decoder import IncrementalDecoder
    from fp8train.inference.generation import make_cache
    from fp8train.inference.kv_modes import kv_quantization
    from fp8train.inference.plan import DecodePlan
    from fp8train.inference.protocol import decoder_parts
    from fp8train.models import build_model, model_config

    torch.manual_seed(0)
    vocab = 32000 if size == "1b" else 257
    model = build_model(model_config(size, vocab_size=vocab, max_seq_len=prompt + steps + 64))
    model = model.to(device, torch.bfloat16)
    parts = decoder_parts(model)
    variants = [("bf16", None, "bf16"), ("w4a16", W4, "int8"), ("w8a16", W8, "int8"), ("w4a16", W4, "int4")]
    rows = []
    for batch in batches:
        base = None
        for weights, spec, kv in variants:
            plan = DecodePlan(parts, weight_spec=spec)
            cache = make_cache(model, kv_quantization(kv), batch, prompt + steps + 1)
            dec = IncrementalDecoder(model, cache, plan)
            ids = torch.randint(0, vocab, (batch, prompt), device=device)
            start = torch.zeros(batch, dtype=torch.long, device=device)
            token = dec.prefill(ids, start)[:, -1].argmax(-1)
            step = GraphedStep(dec.step) if device.type == "cuda" else dec.step
            slots = torch.arange(prompt, prompt + steps, device=device)
            token = step(token, slots[0], start).argmax(-1)  # capture
            sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
            sync()
            t0 = time.perf_counter()
            for i in range(1, steps):
                token = step(token, slots[i], start).argmax(-1)
            sync()
            per_step = (time.perf_counter() - t0) / (steps - 1)
            base = per_step if base is None else base
            row = {"batch": batch, "weights": weights, "kv_cache": kv, "ms/step": f"{per_step * 1e3:.2f}",
                   "tokens/s": f"{batch / per_step:.0f}", "vs bf16": f"{base / per_step:.2f}x",
                   "weight MB": f"{plan.weight_bytes / 2**20:.0f}",
                   "graph": (getattr(step, "failure", None) or "yes") if device.type == "cuda" else "no (cpu)"}
            rows.append(row)
            print(row, flush=True)
            del plan, cache, dec, step
            torch.cuda.empty_cache() if device.type == "cuda" else None
    return rows


DETAILS: list[dict] = []
ARGS = argparse.Namespace(max_configs=6, max_gemv=10, variants=("W4A16", "W8A16", "W8A8 int8", "W8A8 fp8"))
SHAPES = {name: (name, k, n) for name, k, n in SHAPES_1B + SHAPES_8B}


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _check_choices(option: str, given: list[str], allowed, what: str = "") -> None:
    bad = [g for g in given if g not in allowed]
    if bad:
        raise SystemExit(f"{option}: unknown {what + ' ' if what else ''}{bad[0]!r} "
                         f"(choose from {', '.join(map(str, allowed))})")


def main() -> None:
    global ARGS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("."))
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU (logic only)")
    ap.add_argument("--parts", default="gemm,kv,decode")
    ap.add_argument("--max-configs", type=int, default=6, help="GEMM-kernel configurations tried per shape")
    ap.add_argument("--max-gemv", type=int, default=10, help="decode-GEMV configurations tried per shape (M <= 16)")
    ap.add_argument("--ms", default=None, help="gemm part: M values, e.g. 1,16 (default 1,16,128,4096)")
    ap.add_argument("--shapes", default=None, help=f"gemm part: shape names, e.g. '1b qkv,8b down' ({', '.join(SHAPES)})")
    ap.add_argument("--variants", default=",".join(ARGS.variants), help="gemm part: columns to measure")
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--tuned", default=None, help="load a tuned.json of an earlier run first")
    ARGS = args = ap.parse_args()
    args.variants = _csv(args.variants)
    _check_choices("--variants", args.variants, ("W4A16", "W8A16", "W8A8 int8", "W8A8 fp8"))
    shape_names = _csv(args.shapes) if args.shapes else None
    _check_choices("--shapes", shape_names or [], list(SHAPES))
    bad_ms = [v for v in _csv(args.ms or "") if not v.isdigit() or int(v) < 1]
    if bad_ms:
        raise SystemExit(f"--ms: {bad_ms[0]!r} is not a positive integer (e.g. --ms 1,16)")
    gemm_ms = [int(v) for v in _csv(args.ms)] if args.ms else None
    parts = _csv(args.parts)
    _check_choices("--parts", parts, ("gemm", "kv", "decode"), what="part")
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cpu" if args.dry_run else "cuda")
    print(f"device: {device_name()}, torch {torch.__version__}", flush=True)
    tables, t0 = {}, time.time()
    if args.tuned:  # configurations measured before (a tuned.json): decode and kv can run without gemm
        print(f"loaded {lowbit_ops.load_tuned(args.tuned)} tuned entries from {args.tuned}", flush=True)
    for part in parts:  # in the order given
        if part == "gemm":
            shapes = [("tiny", 256, 384)] if args.dry_run else SHAPES_1B + SHAPES_8B
            shapes = [SHAPES[s] for s in shape_names] if shape_names and not args.dry_run else shapes
            ms = gemm_ms or ([1, 130] if args.dry_run else [1, 16, 128, 4096])
            tables["gemm"] = gemm_rows(shapes, ms, device)
            lowbit_ops.dump_tuned(args.out / "tuned.json")
        elif part == "kv":
            tables["kv"] = kv_rows(256 if args.dry_run else args.context, [1] if args.dry_run else [1, 8], device)
        else:
            tables["decode"] = decode_rows("tiny" if args.dry_run else "1b", [1, 2] if args.dry_run else [1, 16],
                                           16 if args.dry_run else 512, 4 if args.dry_run else 64, device)
        # on disk after every part: a call cut short by its time limit keeps what it measured
        (args.out / "bench_inference.json").write_text(json.dumps({"device": device_name(), "tables": tables,
                                                                   "details": DETAILS}, indent=1))
    print(f"\n## {device_name()} ({time.time() - t0:.0f} s)")
    for name, rows in tables.items():
        print(f"\n### {name}")
        print_table(rows, list(dict.fromkeys(c for r in rows for c in r)))
    (args.out / "bench_inference.json").write_text(json.dumps({"device": device_name(), "tables": tables,
                                                               "details": DETAILS}, indent=1))


if __name__ == "__main__":
    main()
