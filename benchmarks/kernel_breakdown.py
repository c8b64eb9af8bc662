"""Where a training step's GPU time goes: kernels.txt files (torch.profiler tables) summed by kind.

    python benchmarks/kernel_breakdown.py e2e/1b_bf16/kernels.txt e2e/1b_hybrid/kernels.txt

bench_e2e.py writes <run>/kernels.txt: torch.profiler's key_averages table sorted by GPU time. This
script reads the "Self CUDA" column of every kernel row and sums it per kind, one column per file,
so a BF16 run and its FP8 twin can be compared slice by slice. The kinds come from kernel names:

    gemm fp8       cuBLAS FP8 GEMMs (nvjet_sm90_q...), Triton grouped FP8 GEMMs (experts/tokens_kernel)
    gemm bf16      other cuBLAS GEMMs (nvjet..., *gemm*, cutlass)
    attention      cuDNN / flash SDPA kernels
    fp8 cast       fused casts and amax reductions (Inductor kernels that feed _scaled_mm, take an
                   amax or call a quantize op, and fp8train's Triton cast kernels). A kernel Inductor
                   fused with its producer (SwiGLU + cast) counts here whole
    optimizer      the fused multi-tensor optimizer kernels
    other triton   the remaining Inductor kernels (norms, SwiGLU, RoPE, residual adds)
    aten           the remaining eager ATen kernels (elementwise, reductions, copies)
    memory         memsets and copies between buffers

The table only reads what the profiler printed: kernels below its row limit are missing from every
column alike, and names are truncated at 55 characters (the kinds need only their beginnings).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

KINDS = ("gemm fp8", "gemm bf16", "attention", "fp8 cast", "optimizer", "other triton", "aten", "memory")
_TIME = re.compile(r"([\d.]+)(ms|us|s)\b")
_UNIT_MS = {"ms": 1.0, "us": 1e-3, "s": 1e3}
NAME_WIDTH = 55  # torch.profiler's name column in these tables


def kind(name: str) -> str:
    """The kind of one kernel name (see the module docstring)."""
    if name.startswith("nvjet_sm90_q") or name.startswith(("experts_kernel", "tokens_kernel", "flat_tokens")):
        return "gemm fp8"
    if name.startswith("nvjet") or "gemm" in name.lower() or "cutlass" in name.lower():
        return "gemm bf16"
    if "sdpa" in name or name.startswith(("cudnn", "void cudnn", "flash")):
        return "attention"
    if "multi_tensor" in name:
        return "optimizer"
    if "scaled_mm" in name or "amax" in name or "quantize" in name or name.startswith("_cast"):
        return "fp8 cast"
    if name.startswith("triton"):
        return "other triton"
    if name.startswith(("Memset", "Memcpy")):
        return "memory"
    return "aten"


def self_cuda_ms(path: Path) -> list[tuple[str, float]]:
    """(kernel name, self CUDA ms) of every row of a profiler table. The columns with units are Self
    CPU, CPU total, CPU time avg, Self CUDA, CUDA total, CUDA time avg: Self CUDA is the fourth."""
    rows = []
    for line in path.read_text().splitlines():
        name, rest = line[:NAME_WIDTH].strip(), line[NAME_WIDTH:]
        times = _TIME.findall(rest)
        if not name or name == "Name" or line.startswith("-") or len(times) < 4:
            continue
        value, unit = times[3]
        rows.append((name, float(value) * _UNIT_MS[unit]))
    return rows


def breakdown(path: Path) -> dict[str, float]:
    """{kind: GPU ms} of one kernels.txt (every kind present, 0.0 when absent)."""
    totals = dict.fromkeys(KINDS, 0.0)
    for name, ms in self_cuda_ms(path):
        totals[kind(name)] += ms
    return totals


def table(paths: list[Path]) -> str:
    """Markdown: one row per kind, one column per file (GPU ms), and the total."""
    columns = [breakdown(p) for p in paths]
    lines = ["| kind | " + " | ".join(p.parent.name or p.name for p in paths) + " |",
             "|---|" + "---|" * len(paths)]
    for k in KINDS:
        if any(c[k] for c in columns):
            lines.append(f"| {k} | " + " | ".join(f"{c[k]:.1f}" for c in columns) + " |")
    lines.append("| total | " + " | ".join(f"{sum(c.values()):.1f}" for c in columns) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("kernels", nargs="+", type=Path, help="kernels.txt files (bench_e2e.py <run>/kernels.txt)")
    args = parser.parse_args(argv)
    missing = [str(p) for p in args.kernels if not p.is_file()]
    if missing:
        print(f"kernel_breakdown: no such file: {', '.join(missing)}", file=sys.stderr)
        return 2
    print("GPU ms per kind of kernel (torch.profiler Self CUDA, summed over the profiled steps)\n")
    print(table(args.kernels))
    return 0


if __name__ == "__main__":
    sys.exit(main())
