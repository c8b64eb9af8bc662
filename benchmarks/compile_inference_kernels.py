"""Compile every inference kernel for an H100 (sm_90) WITHOUT a GPU, and report registers and spills.

    python benchmarks/compile_inference_kernels.py            # needs triton (its bundled ptxas), no GPU

Catches what the CPU interpreter cannot: front-end errors of compiled Triton (types, layouts, dot
shapes), register pressure and spills (ptxas -v). A developer check before the GPU run; not a test.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)


def _sig(fn, types: dict, constexprs: dict, divisible: tuple = ()) -> ASTSource:
    """`divisible`: arguments Triton would specialize as divisible by 16 at run time (pointers of
    fresh tensors, row strides and sizes that are multiples of 16); vectorized loads depend on it."""
    sig = {}
    for name in fn.arg_names:
        sig[name] = "constexpr" if name in constexprs else types.get(name, "i32")
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in divisible}
    return ASTSource(fn, sig, constexprs=constexprs, attrs=attrs)


def _ptxas_report(ptx: str) -> str:
    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    ptxas = next(p for p in (bin_dir / "ptxas-blackwell", bin_dir / "ptxas") if p.exists())  # the newer one
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    out = subprocess.run([str(ptxas), "-v", "--gpu-name=sm_90a", f.name, "-o", os.devnull],
                         capture_output=True, text=True)
    text = out.stderr + out.stdout
    regs = re.search(r"Used (\d+) registers", text)
    spill = re.search(r"(\d+) bytes spill stores", text)
    wide = len(re.findall(r"ld\.global[^\n]*\.v4\.", ptx)) + len(re.findall(r"cp\.async\.cg", ptx))
    return (f"{regs.group(1) if regs else '?'} regs, {spill.group(1) if spill else '?'} B spill stores, "
            f"{wide} 16-byte loads/copies")


def cases():
    from kernels import batched_quant, decode_fused, kv_attention, kv_cache_write, lowbit_gemm, w8a8
    import triton.language as tl

    ptr = {n: "*bf16" for n in ("k_ptr", "v_ptr", "q_ptr", "qo_ptr", "x_ptr", "out_ptr", "res_ptr", "delta_ptr",
                                "w_ptr", "src_k", "src_v", "rk_ptr", "rv_ptr", "sink_k_ptr", "sink_v_ptr")}
    ptr.update({n: "*fp32" for n in ("ks_ptr", "vs_ptr", "s_ptr", "cos_ptr", "sin_ptr", "m_ptr", "l_ptr", "acc_ptr",
                                     "ws_ptr", "scale_ptr", "sa_ptr", "sb_ptr", "mu_ptr")})
    ptr.update({n: "*i64" for n in ("slot_ptr", "start_ptr", "in_ptrs", "codes_ptrs", "scale_ptrs", "zero_ptrs",
                                    "shapes_ptr")})
    ptr.update({"kz_ptr": "*u8", "vz_ptr": "*u8", "z_ptr": "*u8", "cnt_ptr": "*i32", "work_ptr": "*i32",
                "qk_scale": "fp32", "eps": "fp32", "signs_ptr": "*fp32", "inv_sqrt": "fp32"})
    codes = {0: "*bf16", 1: "*u8", 2: "*i8", 3: "*u8", 4: "*bf16", 5: "*u8"}
    for mode in range(6):  # 5: int4_centered (centered, rotated, one BF16 sink token)
        t = dict(ptr, kc_ptr=codes[mode], vc_ptr=codes[mode])
        for rotate in (False, True) if mode == 3 else (mode == 5,):  # int4_hadamard: ROTATE_K
            yield f"kv_write mode {mode} rope{' rotate' if rotate else ''}", kv_cache_write.kv_write_kernel, t, dict(
                MODE=mode, D=128, GROUP=32 if mode in (3, 5) else 128, ROPE=True, REP=2, SOFT=False, ROTATE_K=rotate,
                LOG2_D=7, CENTER=mode == 5, SINK=1 if mode == 5 else 0)
        t = dict(ptr, kc_ptr={4: "*u8"}.get(mode, codes[mode]), vc_ptr={4: "*u8"}.get(mode, codes[mode]))
        for block_n, warps in ((32, 4), (64, 4), (64, 8), (128, 8)):
            yield f"kv_attention mode {mode} n{block_n} w{warps}", kv_attention.kv_attention_kernel, t, dict(
                MODE=mode, D=128, GROUP=32 if mode in (3, 4, 5) else 128, KG=32, REP=2, BLOCK_H=16, BLOCK_N=block_n,
                SINK=1 if mode == 5 else 0), dict(num_warps=warps, num_stages=2)
    t = dict(ptr, kc_ptr="*u8", vc_ptr="*u8")
    for kg, block_n, d in ((8, 16, 64), (8, 64, 128), (16, 16, 128), (128, 32, 128), (32, 16, 32)):
        yield f"kv_attention kivi G{kg} n{block_n} d{d}", kv_attention.kv_attention_kernel, t, dict(
            MODE=4, D=d, GROUP=kg, KG=kg, REP=2, BLOCK_H=16, BLOCK_N=block_n, SINK=0), dict(num_warps=4, num_stages=2)
    yield "kivi_flush", kv_cache_write.kivi_flush_kernel, dict(ptr, kc_ptr="*u8", vc_ptr="*u8"), dict(D=128, G=32,
                                                                                                      DYNAMIC=True)
    yield "kv_reduce", kv_attention.kv_attention_reduce_kernel, ptr, dict(BLOCK_P=64, D=128)
    import torch

    from kernels import lowbit_ops

    lowbit_ops._programs_target = lambda device: 4 * 132  # an H100's SM count, without a GPU
    seen = set()
    for m, k, n in ((1, 2048, 6144), (16, 2048, 6144), (128, 4096, 14336), (4096, 4096, 14336)):
        for bits, asym, group in ((4, True, 128), (8, False, k)):
            every = lowbit_ops.candidate_configs(m, n, k, group, torch.device("cuda"), bits)
            for cfg in [c for c in every if isinstance(c, lowbit_ops.GemmConfig)][:6]:
                key = (bits, cfg, m == 1)
                if key in seen:
                    continue
                seen.add(key)
                t = dict(ptr, w_ptr="*u8" if bits == 4 else "*i8")
                yield (f"lowbit w{bits} M={m} {cfg.name()}", lowbit_gemm.lowbit_matmul_kernel, t,
                       dict(WBITS=bits, ASYM=asym, GROUP=group, PER_ROW=group == k, BLOCK_M=cfg.block_m,
                            BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT_K=cfg.split_k, UNROLL=cfg.unroll,
                            SWIGLU=False, TRANS=cfg.trans),
                       dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
    yield from _gemv_cases(ptr)
    yield "dequantize w4", lowbit_gemm.dequantize_kernel, dict(ptr, w_ptr="*u8"), dict(
        WBITS=4, ASYM=True, GROUP=128, PER_ROW=False, BLOCK_N=32, BLOCK_K=128)
    for fp8 in (False, True):
        yield f"quantize_rows fp8={fp8}", w8a8.quantize_rows_kernel, dict(ptr, codes_ptr="*u8" if fp8 else "*i8"), dict(
            FP8=fp8, BLOCK_K=2048, SOFT=False)
    for cfg in lowbit_ops.int8_candidates():
        yield f"int8_matmul {cfg.name()}", w8a8.int8_matmul_kernel, dict(ptr, a_ptr="*i8", b_ptr="*i8"), dict(
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=8), dict(
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    yield "batched_quantize u4 g128", batched_quant.batched_quantize_kernel, ptr, dict(
        IN_DTYPE=tl.bfloat16, CODE_DTYPE=tl.uint8, BITS=4, ASYM=True, GROUP=128, BLOCK_R=16, BLOCK_G=64)
    yield "add_rmsnorm", decode_fused.add_rmsnorm_kernel, ptr, dict(HAS_DELTA=True, BLOCK_D=2048)


def _gemv_cases(ptr: dict):
    """The decode GEMV's candidates (kernels/lowbit_gemv.py) for M = 1 and 16, W4 g128 and W8 per row."""
    from kernels import lowbit_gemv
    from kernels.lowbit_gemv_ops import SplitReduce, gemv_candidates

    fn = lowbit_gemv.lowbit_gemv_kernel
    divisible = tuple(n for n in fn.arg_names if n.endswith("_ptr") or n in ("stride_xm", "stride_wn", "N", "K"))
    for m, k, n in ((1, 4096, 14336), (16, 4096, 14336), (1, 14336, 4096)):
        for bits, asym, group in ((4, True, 128), (8, False, k)):
            for cfg in gemv_candidates(m, n, k, group, bits, 4 * 132):
                mode = 0 if cfg.split_k == 1 else 1 if cfg.reduce is SplitReduce.ATOMIC else 2
                types = dict(ptr, w_ptr="*i32", out_ptr="*bf16" if mode == 0 else "*fp32")
                yield (f"gemv w{bits} M={m} K={k} {cfg.name()}", fn, types,
                       dict(WBITS=bits, ASYM=asym, GROUP=group, PER_ROW=group >= k, GPT=max(1, cfg.block_k // group),
                            BLOCK_M=cfg.block_m(m), BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT_K=cfg.split_k,
                            SPLIT_MODE=mode, DOT=cfg.dot, SWIGLU=False, STAGES=cfg.num_stages),
                       dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages), divisible)


def main() -> int:
    failures = 0
    for case in cases():
        name, fn, types, constexprs = case[:4]
        options = case[4] if len(case) > 4 else {}
        divisible = case[5] if len(case) > 5 else ()
        try:
            compiled = triton.compile(_sig(fn, types, constexprs, divisible), target=TARGET, options=options)
            print(f"ok    {name:52s} {_ptxas_report(compiled.asm['ptx'])}", flush=True)
        except Exception as error:  # report every kernel, then fail
            failures += 1
            print(f"FAIL  {name:40s} {type(error).__name__}: {str(error)[:300]}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
