"""Launchers of the low-bit GEMM kernels, their launch configurations, and W8A8 / batched quantization.

Configurations are data: `GemmConfig` (tile sizes, split-K, warps, stages). `pick_config` uses a
table measured on the target GPU when one was loaded (`load_tuned(path)`: the JSON that
benchmarks/bench_inference.py writes with the fastest VERIFIED configuration per shape), else a
heuristic: decode sizes (M <= 16) split N and K until about four programs per SM are in flight;
larger M uses tensor-core tiles. `candidate_configs` lists what the benchmark tries.

Every launcher validates its inputs and never synchronises with the host (CUDA-graph safe).
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from kernels._backend import kernel_backend
from kernels.launcher import cdiv, next_power_of_2
from kernels.lowbit_gemv_ops import GemvConfig, gemv_candidates, lowbit_gemv


@dataclass(frozen=True)
class GemmConfig:
    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    unroll: int = 1  # K-steps per loop iteration (weight-only kernel)
    trans: bool = False  # compute out^T tiles: weights as the tensor cores' left operand
    interleave: bool = True  # 4-bit: codes back in K order in registers, one dot (else two over even/odd x)

    def name(self) -> str:
        tail = (f"u{self.unroll}" if self.unroll > 1 else "") + ("T" if self.trans else "") + ("" if self.interleave else "E")
        return f"m{self.block_m}n{self.block_n}k{self.block_k}s{self.split_k}w{self.num_warps}st{self.num_stages}{tail}"


TUNED: dict[str, GemmConfig | GemvConfig] = {}  # shape key -> measured best (load_tuned)
STRATEGY: dict[str, str] = {}  # shape key -> "fused" | "dequant" (weight-only, large M), measured
DEQUANT_MIN_M = 1024  # untuned default: from this M on, dequantize + cuBLAS instead of the fused kernel
# Untuned M <= GEMV_MAX_M on a GPU: the decode GEMV (kernels/lowbit_gemv.py) instead of
# lowbit_matmul_kernel. Measured on an H200 (benchmarks/results/h200x2_session6/call4_gemv), W4A16 g128,
# the GEMV's first candidate vs the GEMM kernel's heuristic: M = 1 11.8 vs 13.8 us (1b qkv),
# 33.8 vs 42.6 us (8b up), 33.0 vs 83.3 us (8b down); at M = 16 the GEMM kernel's tensor-core tile
# wins (16.6-69.7 us vs 21.6-79.6). 0: never. A tuned JSON picks either kernel per shape.
GEMV_MAX_M = 1


def shape_key(kind: str, m: int, n: int, k: int) -> str:
    """Tuning buckets: M = 1 (CUDA-core GEMV), 2..16 (decode), then M rounded up to a power of two."""
    bucket = 1 if m == 1 else 16 if m <= 16 else next_power_of_2(m)
    return f"{kind}:{bucket}:{n}:{k}"


def load_tuned(path: str | Path) -> int:
    """Load {"configs": {shape_key: GemmConfig fields}, "strategy": {shape_key: name}} written by the
    benchmark; returns how many entries."""
    raw = json.loads(Path(path).read_text())
    for key, fields in raw.get("configs", {}).items():
        TUNED[key] = GemvConfig.from_json(fields) if fields.get("kernel") == "gemv" else GemmConfig(**fields)
    STRATEGY.update(raw.get("strategy", {}))
    return len(raw.get("configs", {})) + len(raw.get("strategy", {}))


def dump_tuned(path: str | Path) -> None:
    configs = {k: v.to_json() if isinstance(v, GemvConfig) else asdict(v) for k, v in sorted(TUNED.items())}
    Path(path).write_text(json.dumps({"configs": configs, "strategy": dict(sorted(STRATEGY.items()))}, indent=1))


def weight_only_strategy(kind: str, m: int, n: int, k: int) -> str:
    """"fused" (dequantize inside the GEMM) or "dequant" (dequantize the weight, then cuBLAS)."""
    return STRATEGY.get(shape_key(kind, m, n, k)) or ("dequant" if m >= DEQUANT_MIN_M else "fused")


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _programs_target(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return 4 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def _largest_split(k_steps: int, want: int) -> int:
    split = 1
    while split * 2 <= want and k_steps % (split * 2) == 0:
        split *= 2
    return split


# Decode-size shapes (block_n, warps, unroll), ordered best-first by what we expect on an H100: few
# registers (ptxas -v for sm_90, benchmarks/compile_inference_kernels.py) so that several programs
# share an SM, and several K-steps of weight loads in flight per program.
_SMALL_M = {
    (4, True): ((32, 4, 4), (64, 8, 2), (32, 4, 2), (64, 4, 1)),  # M = 1, CUDA-core GEMV
    (4, False): ((64, 8, 2), (32, 4, 2), (32, 4, 4)),  # M <= 16, tensor cores
    (8, True): ((64, 8, 2), (32, 8, 2), (32, 4, 1)),
    (8, False): ((64, 8, 2), (32, 4, 1), (32, 8, 2)),
}


def _block_k(k: int, group: int) -> int:
    block_k = min(group, 128) if group < k else 128
    while k % block_k:
        block_k //= 2
    return block_k


def _small_m_config(m: int, n: int, k: int, block_k: int, shape: tuple, device: torch.device) -> GemmConfig:
    block_n, warps, unroll = shape
    while unroll > 1 and (k // block_k) % unroll:
        unroll //= 2
    split = _largest_split(k // (block_k * unroll), max(1, _programs_target(device) // cdiv(n, block_n)))
    return GemmConfig(1 if m == 1 else 16, block_n, block_k, split, warps, 3, unroll)


def heuristic_config(m: int, n: int, k: int, group: int, device: torch.device,
                     bits: int = 4) -> GemmConfig | GemvConfig:
    if m <= min(GEMV_MAX_M, 16) and device.type == "cuda":
        return _gemv_heuristic(m, n, k, group, bits, _programs_target(device))
    return _gemm_heuristic(m, n, k, group, device, bits)


@functools.lru_cache(maxsize=None)
def _gemv_heuristic(m: int, n: int, k: int, group: int, bits: int, programs: int) -> GemvConfig:
    """The GEMV's first candidate, once per shape (an untuned decode call asks for it every step)."""
    return gemv_candidates(m, n, k, group, bits, programs)[0]


def _gemm_heuristic(m: int, n: int, k: int, group: int, device: torch.device, bits: int) -> GemmConfig:
    block_k = _block_k(k, group)
    if device.type != "cuda":  # Triton's interpreter: few, large programs (its cost is per operation)
        return GemmConfig(16 if m <= 16 else 64, 128, block_k, 1, 4, 1)
    if m <= 16:  # memory bound: many programs, several K-steps in flight each; M = 1 on the CUDA cores
        return _small_m_config(m, n, k, block_k, _SMALL_M[(bits, m == 1)][0], device)
    if m <= 64:
        return GemmConfig(next_power_of_2(m), 64, block_k, 1, 4, 3)
    return GemmConfig(128 if m >= 128 else 64, 128, min(block_k, 64), 1, 8, 3, 1, True)


def candidate_configs(m: int, n: int, k: int, group: int, device: torch.device,
                      bits: int = 4) -> list[GemmConfig | GemvConfig]:
    """What the benchmark measures for one shape (the heuristic first, then the likeliest winners);
    for M <= 16 the decode GEMV's candidates (GemvConfig) follow the GEMM's."""
    block_k = _block_k(k, group)
    out = [_gemm_heuristic(m, n, k, group, device, bits)]
    if m <= 16:
        shapes = [(True, sh) for sh in _SMALL_M[(bits, True)]] if m == 1 else []
        shapes += [(False, sh) for sh in _SMALL_M[(bits, False)]]
        for gemv, shape in shapes:
            cfg = _small_m_config(1 if gemv else 16, n, k, block_k, shape, device)
            out.append(cfg)
    else:
        bm = 64 if m <= 64 else 128
        out += [GemmConfig(bm, bn, bk, 1, w, s, 1, t) for bn, bk, w, s, t in
                ((128, 64, 8, 3, False), (128, 64, 8, 4, True), (64, 64, 4, 4, True), (128, 128, 8, 3, True))
                if bk <= block_k or group >= k]
    if bits == 4:  # the even/odd two-dot form as well (measured, not assumed): the heuristic's first
        out = [out[0], replace(out[0], interleave=False), *out[1:], *(replace(c, interleave=False) for c in out[1:])]
    seen, unique = set(), []
    for c in out:
        if c not in seen and k % (c.block_k * c.split_k * c.unroll) == 0:
            seen.add(c)
            unique.append(c)
    return unique + (gemv_candidates(m, n, k, group, bits, _programs_target(device)) if m <= 16 else [])


def pick_config(kind: str, m: int, n: int, k: int, group: int, device: torch.device,
                bits: int = 4) -> GemmConfig | GemvConfig:
    return TUNED.get(shape_key(kind, m, n, k)) or heuristic_config(m, n, k, group, device, bits)


# ---- split-K workspaces -------------------------------------------------------------------------
_WORKSPACES: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def workspace(device: torch.device, m: int, n: int, tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(zeroed FP32 [m, n], zeroed int32 counters [tiles]); the kernel leaves them zero again."""
    key = (device, m, n, tiles)
    if key not in _WORKSPACES:
        _WORKSPACES[key] = (torch.zeros(m, n, device=device, dtype=torch.float32),
                            torch.zeros(tiles, device=device, dtype=torch.int32))
    return _WORKSPACES[key]


def _check_triton(x: torch.Tensor) -> None:
    name, reason = kernel_backend(x)
    if name == "reference":
        raise RuntimeError(f"low-bit kernels need Triton for this tensor: {reason}")


def lowbit_matmul(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                  bits: int, group: int, k: int, config: GemmConfig | GemvConfig | None = None,
                  swiglu: bool = False, kind: str = "w4a16") -> torch.Tensor:
    """x [M, K] (or [M, 2K] with swiglu) @ W^T -> [M, N] in x's dtype. group = K: per-row scales.
    A GemvConfig (given, or tuned for this shape) runs the decode GEMV (kernels/lowbit_gemv.py)."""
    from kernels.lowbit_gemm import lowbit_matmul_kernel

    _check_triton(x)
    m, n = x.shape[0], codes.shape[0]
    if x.stride(-1) != 1:
        x = x.contiguous()
    cfg = config or pick_config(kind, m, n, k, group, x.device, bits)
    if isinstance(cfg, GemvConfig):
        return lowbit_gemv(x, codes, scale, zero, bits, group, k, cfg, swiglu)
    if k % (cfg.block_k * cfg.split_k * cfg.unroll) or (group < k and group % cfg.block_k):
        raise ValueError(f"config {cfg.name()} does not tile K={k} with group {group}")
    out = torch.empty(m, n, device=x.device, dtype=x.dtype)
    tiles = cdiv(m, cfg.block_m) * cdiv(n, cfg.block_n)
    ws, counters = workspace(x.device, m, n, tiles) if cfg.split_k > 1 else (out, scale)
    z = zero if zero is not None else scale
    lowbit_matmul_kernel[(tiles, cfg.split_k)](
        x, x.stride(0), codes, codes.stride(0), scale, scale.stride(0), z, z.stride(0), out, out.stride(0),
        ws, counters, m, n, k, WBITS=bits, ASYM=zero is not None, GROUP=group, PER_ROW=group >= k,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT_K=cfg.split_k, UNROLL=cfg.unroll,
        SWIGLU=swiglu, TRANS=cfg.trans and cfg.block_m > 1, INTERLEAVE=cfg.interleave,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out


def dequantize_weight(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int, group: int,
                      k: int, dtype: torch.dtype) -> torch.Tensor:
    """[N, K] in `dtype`: (code - zero) * scale, rounded once."""
    from kernels.lowbit_gemm import dequantize_kernel

    _check_triton(codes)
    n = codes.shape[0]
    block_k = min(group, 128) if group < k else 128
    while k % block_k:
        block_k //= 2
    out = torch.empty(n, k, device=codes.device, dtype=dtype)
    z = zero if zero is not None else scale
    dequantize_kernel[(cdiv(n, 32), k // block_k)](
        codes, codes.stride(0), scale, scale.stride(0), z, z.stride(0), out, n, k, WBITS=bits,
        ASYM=zero is not None, GROUP=group, PER_ROW=group >= k, BLOCK_N=32, BLOCK_K=block_k)
    return out


def quantize_rows(x: torch.Tensor, fp8: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token (row) current scaling of x [M, K]: (codes [M, K] int8 or e4m3, scale_inv [M, 1] FP32)."""
    from kernels.w8a8 import quantize_rows_kernel

    name, reason = kernel_backend(x)
    if name == "reference":
        raise RuntimeError(f"quantize_rows needs Triton for this tensor: {reason}")
    m, k = x.shape
    codes = torch.empty(m, k, device=x.device, dtype=torch.uint8 if fp8 else torch.int8)
    scale = torch.empty(m, 1, device=x.device, dtype=torch.float32)
    quantize_rows_kernel[(m,)](x, x.stride(0), codes, scale, k, FP8=fp8, BLOCK_K=min(2048, next_power_of_2(k)),
                               SOFT=name == "triton-soft", num_warps=8 if k >= 4096 else 4)
    return (codes.view(torch.float8_e4m3fn) if fp8 else codes), scale


def int8_matmul(xq: torch.Tensor, sx: torch.Tensor, wq: torch.Tensor, sw: torch.Tensor, out_dtype: torch.dtype,
                config: GemmConfig | None = None) -> torch.Tensor:
    """(xq [M, K] @ wq [N, K]^T) * sx[m] * sw[n], INT8 tensor cores, scaling in the epilogue."""
    from kernels.w8a8 import int8_matmul_kernel

    _check_triton(xq)
    m, k = xq.shape
    n = wq.shape[0]
    cfg = config or TUNED.get(shape_key("w8a8_int8", m, n, k)) or GemmConfig(128, 128, 128, 1, 8, 3)
    if k % cfg.block_k:
        raise ValueError(f"K={k} is not a multiple of block_k={cfg.block_k}")
    out = torch.empty(m, n, device=xq.device, dtype=out_dtype)
    grid = (cdiv(m, cfg.block_m) * cdiv(n, cfg.block_n),)
    int8_matmul_kernel[grid](xq, wq, sx, sw, out, m, n, k, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                             BLOCK_K=cfg.block_k, GROUP_M=8, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out


def int8_candidates() -> list[GemmConfig]:
    return [GemmConfig(128, 128, 128, 1, 8, 3), GemmConfig(128, 256, 128, 1, 8, 3), GemmConfig(128, 128, 64, 1, 4, 4),
            GemmConfig(64, 128, 128, 1, 4, 4), GemmConfig(256, 128, 64, 1, 8, 3)]


def batched_quantize(weights: list[torch.Tensor], bits: int, symmetric: bool, group: int = 0,
                     block_r: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """Quantize every weight [N_i, K_i] in ONE launch: [(codes, scale [N, K/G or 1], zero or None)].

    bits 4 (codes packed [N, K/2] uint8) or 8; symmetric (INT4/INT8) or not (UINT4/UINT8 + zero);
    group > 0: one grid per G columns, 0: one per row."""
    from kernels.batched_quant import batched_quantize_kernel
    import triton.language as tl

    if not weights:
        return []
    dtype, device = weights[0].dtype, weights[0].device
    for i, w in enumerate(weights):
        if w.dim() != 2 or w.dtype != dtype or w.device != device or not w.is_contiguous():
            raise ValueError(f"weight {i}: batched_quantize needs contiguous 2-D tensors of one dtype and device")
        if group and w.shape[1] % group or (not group and w.shape[1] % 64):
            raise ValueError(f"weight {i} of shape {tuple(w.shape)}: K must be a multiple of "
                             f"{group or 64} ({'group size' if group else 'row blocks'})")
    _check_triton(weights[0])
    block_r = block_r or (16 if device.type == "cuda" else 128)
    code_dtype = torch.uint8 if bits == 4 or not symmetric else torch.int8
    outs = []
    for w in weights:
        n, k = w.shape
        factors = k // group if group else 1
        codes = torch.empty(n, k // 2 if bits == 4 else k, device=device, dtype=code_dtype)
        scale = torch.empty(n, factors, device=device, dtype=torch.float32)
        zero = None if symmetric else torch.empty(n, factors, device=device, dtype=torch.uint8)
        outs.append((codes, scale, zero))
    table = lambda ts: torch.tensor([t.data_ptr() for t in ts], dtype=torch.int64, device=device)  # noqa: E731
    work = [(i, b) for i, w in enumerate(weights) for b in range(cdiv(w.shape[0], block_r))]
    shapes = torch.tensor([list(w.shape) for w in weights], dtype=torch.int64, device=device)
    tl_dtype = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype]
    batched_quantize_kernel[(len(work),)](
        torch.tensor(work, dtype=torch.int32, device=device), table(weights), table([o[0] for o in outs]),
        table([o[1] for o in outs]), table([o[2] if o[2] is not None else o[1] for o in outs]), shapes,
        IN_DTYPE=tl_dtype, CODE_DTYPE=tl.uint8 if code_dtype == torch.uint8 else tl.int8, BITS=bits,
        ASYM=not symmetric, GROUP=group, BLOCK_R=block_r, BLOCK_G=64)
    return outs
