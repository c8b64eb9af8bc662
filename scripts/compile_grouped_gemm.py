"""Compile the grouped FP8 GEMM kernels for sm_90 WITHOUT a GPU and print their resource usage.

    python scripts/compile_grouped_gemm.py [--all]           # the CONFIGS table (--all: + sweep set)
    PYTHONPATH=/path/to/triton-3.6:$PWD python scripts/compile_grouped_gemm.py   # the box's Triton

Triton compiles for a GPUTarget("cuda", 90) on any machine (ptxas ships with it). For every
(form, scaling, dtype pair, config) this prints registers per thread, stack bytes (spills show up
as STACK > 0), shared memory and the wgmma instruction Triton chose: a config that spills or needs
more than the H100's 227 KiB of shared memory is useless before it is ever timed. Run it without
TRITON_INTERPRET.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from kernels import grouped_gemm  # noqa: E402
from kernels.grouped_gemm_configs import CONFIGS, Form, Scaling, TileConfig  # noqa: E402

FP8 = {"e4m3": "*fp8e4nv", "e5m2": "*fp8e5"}
INTS_EXPERTS = ["T", "N", "K", "E", "stride_a", "stride_be", "stride_bn", "stride_out", "stride_sa_m", "stride_sa_k",
                "stride_sb_e", "stride_sb_n", "stride_sb_k"]
INTS_TOKENS = ["M", "N", "T", "E", "stride_a", "stride_b", "stride_out_e", "stride_out_m", "stride_sa_m",
               "stride_sa_t", "stride_sb_n", "stride_sb_t"]
ALIGNED = {"N", "K", "T", "M", "stride_a", "stride_b", "stride_be", "stride_bn", "stride_out", "stride_out_e",
           "stride_out_m"}


def sweep_candidates() -> list[TileConfig]:
    """The configurations benchmarks/bench_grouped_gemm.py --sweep times (kept in one place)."""
    from benchmarks.bench_grouped_gemm import SWEEP  # noqa: PLC0415

    return sorted(set(SWEEP), key=str)


def _signature(form: Form, a: str, b: str, out: str) -> tuple[dict, dict]:
    ints = INTS_EXPERTS if form is Form.EXPERTS else INTS_TOKENS
    sig = {"a_ptr": FP8[a], "b_ptr": FP8[b], "out_ptr": out, "offs_ptr": "*i32", "sa_ptr": "*fp32",
           "sb_ptr": "*fp32", **{name: "i32" for name in ints}}
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(sig)
             if sig[name].startswith("*") or name in ALIGNED}
    return sig, attrs


def _constexprs(form: Form, scaling: Scaling, config: TileConfig, fast_accum: bool, flat: bool) -> dict:
    c = {"BLOCKWISE": scaling is Scaling.BLOCKWISE, "FAST_ACCUM": fast_accum, "USE_TMA": config.use_tma}
    if not flat:
        c["FLATTEN"] = config.flatten
    c.update({"BM": config.bm, "BN": config.bn, "BK": config.bk})
    if form is Form.TOKENS and not flat:
        c["TAIL_K"] = config.tail_k
    c.update({"GROUP_M": config.group_m, "NUM_STAGES": config.num_stages})
    if form is Form.EXPERTS or flat:
        c["E_POW2"] = 64
    return c


def compile_one(form, scaling, config, a="e4m3", b="e4m3", out="*bf16", fast_accum=False, flat=False) -> dict:
    """flat: the tokens form's flat kernel (kernels/grouped_gemm_flat.py; aligned groups)."""
    from kernels import grouped_gemm_flat  # noqa: PLC0415

    fn = grouped_gemm.experts_kernel if form is Form.EXPERTS else \
        (grouped_gemm_flat.tokens_kernel_flat if flat else grouped_gemm.tokens_kernel)
    sig, attrs = _signature(form, a, b, out)
    constexprs = _constexprs(form, scaling, config, fast_accum, flat)
    sig.update({name: "constexpr" for name in constexprs})
    src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": config.num_warps, "num_stages": config.num_stages})
    return {"shared": kernel.metadata.shared, **_resources(kernel.asm["cubin"]),
            "mma": sorted(set(re.findall(r"wgmma\.mma_async\.\S*?\.(m64n\d+k\d+)", kernel.asm["ptx"]))),
            "pendings": sorted(set(re.findall(r"pendings = (\d+)", kernel.asm["ttgir"])))}


def _resources(cubin: bytes) -> dict:
    bindir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        text = subprocess.run([str(bindir / "cuobjdump"), "--dump-resource-usage", f.name], capture_output=True,
                              text=True, check=True).stdout
    finally:
        os.unlink(f.name)
    found = dict(re.findall(r"(REG|STACK):(\d+)", text))
    return {"regs": int(found.get("REG", -1)), "stack": int(found.get("STACK", -1))}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--all", action="store_true", help="also every sweep candidate")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("unset TRITON_INTERPRET: this compiles for the GPU")
    jobs = [(form, scaling, cfg, fast) for (form, scaling, _, fast), cfg in CONFIGS.items()]
    if args.all:
        modes = ((Scaling.TENSORWISE, True), (Scaling.TENSORWISE, False), (Scaling.BLOCKWISE, False))
        jobs += [(form, scaling, cfg, fast) for cfg in sweep_candidates() for form in Form for scaling, fast in modes
                 if scaling is Scaling.TENSORWISE or (cfg.bk == 128 and cfg.bn <= 128)]
    print(f"triton {triton.__version__}, target sm_90")
    for form, scaling, cfg, fast in dict.fromkeys(jobs):
        for flat in ((False, True) if form is Form.TOKENS and cfg.flatten else (False,)):
            for a, b in (("e4m3", "e4m3"), ("e5m2", "e4m3")):
                try:
                    r = compile_one(form, scaling, cfg, a, b, fast_accum=fast, flat=flat)
                    line = (f"regs {r['regs']:3d} stack {r['stack']:4d} smem {r['shared'] // 1024:3d} KiB "
                            f"{','.join(r['mma'])} wgmma waits {','.join(r['pendings'])}")
                except Exception as exc:  # report and go on: one bad config must not hide the others
                    line = f"FAILED {type(exc).__name__}: {str(exc).splitlines()[0][:100]}"
                name = f"{form.value}{'-flat' if flat else ''}"
                print(f"{name:11s} {scaling.value:10s} {a}x{b} fast={int(fast)} [{cfg}]: {line}", flush=True)

if __name__ == "__main__":
    main()
