"""--sweep of bench_grouped_gemm.py: time candidate tile configs per grouped GEMM, print the best.

For each GEMM of the layer and each mode it runs (tensorwise fast E4M3, tensorwise promoted E5M2 x
E4M3, tensorwise with 128-aligned groups (grad_weight), blockwise), every config of
`bench_grouped_gemm.SWEEP` that the mode can use is timed through the public entry point's
`config=` override. A config the compiler rejects (shared memory) prints
an error cell. The last table is the best config per (GEMM, mode): what goes into
kernels/grouped_gemm_configs.CONFIGS.
"""

from __future__ import annotations

import torch

import kernels
from benchmarks.common import device_name, print_table
from benchmarks.grouped_gemm_cases import ROLES
from kernels.grouped_gemm_configs import Form

MODES = {"output": ["tw fast", "blockwise"], "grad_input": ["tw e5m2", "blockwise"],
         "grad_weight": ["tw e5m2", "tw fast", "tw a128", "blockwise"]}


def _call(form: Form, mode: str, d: dict, names: tuple[str, str], config):
    """The entry-point call of `mode` with an explicit config (operand names as in bench_grouped_gemm)."""
    a, b = d[names[0]], d[names[1]]
    bf16, offs = torch.bfloat16, d["ragged"].offs
    if form is Form.EXPERTS:
        if mode == "blockwise":
            return lambda: kernels.grouped_mm_experts_blockwise(a["block"][0], b["block"][0], a["block"][1],
                                                                b["block"][1], offs, bf16, config=config)
        tag, fast = ("4", True) if mode == "tw fast" else ("5", False)
        return lambda: kernels.grouped_mm_experts_tensorwise(a[tag][0], b["4"][0], a[tag][1], b["4"][1], offs, bf16,
                                                             fast, config=config)
    if mode == "blockwise":
        return lambda: kernels.grouped_mm_tokens_blockwise(a["block_t128"][0], b["block_t128"][0],
                                                           a["block_t128"][1], b["block_t128"][1], d["pad128"].offs,
                                                           bf16, config=config)
    if mode == "tw a128":  # groups padded to 128: the flat loop (when the config flattens)
        return lambda: kernels.grouped_mm_tokens_tensorwise(a["5t128"][0], b["4t128"][0], a["5t128"][1],
                                                            b["4t128"][1], d["pad128"].offs, bf16, False, True,
                                                            config=config)
    tag, fast = ("4t", True) if mode == "tw fast" else ("5t", False)
    return lambda: kernels.grouped_mm_tokens_tensorwise(a[tag][0], b["4t"][0], a[tag][1], b["4t"][1], offs, bf16,
                                                        fast, config=config)


def _operands(role: str, proj: str) -> tuple[Form, tuple[str, str]]:
    if role == "grad_weight":
        return Form.TOKENS, (("h", "x") if proj == "gate|up" else ("x", "h"))
    return Form.EXPERTS, {("output", "gate|up"): ("x", "w1"), ("output", "down"): ("h", "w2"),
                          ("grad_input", "gate|up"): ("h", "w2"), ("grad_input", "down"): ("x", "w1")}[(role, proj)]


def _flop(form, names, d) -> float:
    t = d["ragged"].total
    if form is Form.TOKENS:
        return 2 * t * d[names[0]]["hp"].shape[1] * d[names[1]]["hp"].shape[1]
    n, k = d[names[1]]["hp"].shape[1:]
    return 2 * t * n * k


def sweep_layer(d: dict, repeats: int, modes: list[str] | None = None) -> list[dict]:
    """Every (GEMM, mode) of the layer x every SWEEP config; `modes` keeps only those modes."""
    from benchmarks.bench_grouped_gemm import SWEEP, _sync, time_ms  # noqa: PLC0415 (they live beside the bench)

    rows, best = [], {}
    for role, proj in ROLES:
        form, names = _operands(role, proj)
        flop = _flop(form, names, d)
        for mode in (m for m in MODES[role] if modes is None or m in modes):
            candidates = [c for c in SWEEP if mode != "blockwise" or (c.bk == 128 and c.bn <= 128)]
            for config in candidates:
                row = {"gemm": f"{role} {proj}", "mode": mode, "config": str(config)}
                try:
                    ms = time_ms(_call(form, mode, d, names, config), repeats)
                    row.update(ms=f"{ms:.3f}", tflops=f"{flop / ms / 1e9:.0f}")
                    key = (row["gemm"], mode)
                    if key not in best or ms < best[key][0]:
                        best[key] = (ms, row)
                except Exception as exc:  # out of shared memory, unsupported layout: report, go on
                    _sync()
                    row.update(ms="error", tflops=f"{type(exc).__name__}: {str(exc).splitlines()[0][:60]}")
                print(f"  {row['gemm']:22s} {mode:9s} {row['config']:45s} {row['ms']:>8s} {row['tflops']}",
                      flush=True)
                rows.append(row)
    print(f"\nbest config per GEMM and mode on {device_name()}")
    print_table([r for _, r in best.values()], ["gemm", "mode", "config", "ms", "tflops"])
    return rows
