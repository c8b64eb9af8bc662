"""Launcher, configurations and candidates of the decode GEMV (kernels/lowbit_gemv.py), M <= 16.

    out = lowbit_gemv(x, codes, scale, zero, bits=4, group=128, k=K, config=GemvConfig(32, 256))

Same weight layout and semantics as kernels.lowbit_ops.lowbit_matmul (which dispatches here when
its configuration is a `GemvConfig`): codes [N, K/2] uint8 (4 bits, low nibble = even k) or [N, K]
int8/uint8, FP32 scales [N, K/G] (G = K: per row), uint8 zeros for asymmetric grids. The codes are
viewed as int32 words in place (no copy, no new layout). Split-K partials are combined with FP32
atomics into a zeroed buffer or through a per-split workspace and a summing kernel (`SplitReduce`);
no counters, the buffers are fresh allocations (CUDA-graph safe: the caching allocator's pool).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import Enum

import torch

from kernels.launcher import cdiv, next_power_of_2

MAX_M = 16  # decode sizes; larger M belongs to the tensor-core GEMM
X_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


class SplitReduce(Enum):
    ATOMIC = "atomic"  # FP32 atomic_add into a zeroed [M, N], cast afterwards
    REDUCE = "reduce"  # FP32 partials [SPLIT_K, M, N], summed (and cast) by a second kernel


@dataclass(frozen=True)
class GemvConfig:
    block_n: int
    block_k: int
    split_k: int = 1
    reduce: SplitReduce = SplitReduce.ATOMIC
    num_warps: int = 4
    num_stages: int = 1  # software-pipeline depth of the K loop (1: plain loads into registers)
    dot: bool = False  # tensor cores (x padded to 16 rows) instead of CUDA-core FMAs

    def name(self) -> str:
        split = f"s{self.split_k}{self.reduce.value[0]}" if self.split_k > 1 else "s1"
        return f"gemv_n{self.block_n}k{self.block_k}{split}w{self.num_warps}st{self.num_stages}{'D' if self.dot else ''}"

    def block_m(self, m: int) -> int:
        return 16 if self.dot else min(next_power_of_2(m), MAX_M)

    def to_json(self) -> dict:
        return {**asdict(self), "reduce": self.reduce.value, "kernel": "gemv"}

    @classmethod
    def from_json(cls, fields: dict) -> "GemvConfig":
        fields = {k: v for k, v in fields.items() if k != "kernel"}
        return cls(**{**fields, "reduce": SplitReduce(fields.get("reduce", "atomic"))})


def _fail(what: str, fix: str) -> None:
    raise ValueError(f"lowbit_gemv: {what}; {fix}")


def check_gemv(x: torch.Tensor, codes: torch.Tensor, bits: int, group: int, k: int, cfg: GemvConfig) -> None:
    """Every rule the kernel relies on, as a ValueError naming the value and the fix."""
    if bits not in (4, 8):
        _fail(f"bits={bits}", "use 4 or 8")
    if x.dtype not in X_DTYPES:
        _fail(f"x dtype {x.dtype}", f"pass x as one of {[str(d) for d in X_DTYPES]}")
    want = (torch.uint8,) if bits == 4 else (torch.int8, torch.uint8)
    if codes.dtype not in want or codes.dim() != 2 or codes.shape[1] * 8 != k * bits:
        _fail(f"codes {codes.dtype} {tuple(codes.shape)} for {bits}-bit K={k}",
              f"pass [N, {k * bits // 8}] {' or '.join(str(d) for d in want)} codes (prepare_weight)")
    per_word = 32 // bits
    bk, split = cfg.block_k, cfg.split_k
    if bk < per_word or bk & (bk - 1):
        _fail(f"block_k={bk}", f"use a power of two >= {per_word} (codes per 32-bit word)")
    if k % (bk * split):
        _fail(f"K={k} is not a multiple of block_k * split_k = {bk} * {split}", "pick block_k and split_k dividing K")
    if cfg.block_n & (cfg.block_n - 1):
        _fail(f"block_n={cfg.block_n}", "use a power of two")
    if group < k and group % bk and (bk % group or group % per_word or (group // per_word) & (group // per_word - 1)):
        _fail(f"block_k={bk} with group {group}", "use a block_k that divides the group or a power-of-two multiple")
    if cfg.dot and (bk // per_word < 16 or (group < k and bk > group)):
        _fail(f"dot=True with block_k={bk}, group {group}",
              f"tensor-core tiles need block_k >= {16 * per_word} and one group per tile (block_k <= group)")
    if x.shape[0] > MAX_M:
        _fail(f"M={x.shape[0]}", f"use the GEMM (lowbit_matmul with a GemmConfig) above M={MAX_M}")


def lowbit_gemv(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int,
                group: int, k: int, config: GemvConfig, swiglu: bool = False) -> torch.Tensor:
    """x [M, K] (or [M, 2K] with swiglu: silu(gate) * up) @ W^T -> [M, N] in x's dtype, M <= 16."""
    from kernels.lowbit_gemv import lowbit_gemv_kernel, splitk_sum_kernel

    cfg = config
    check_gemv(x, codes, bits, group, k, cfg)
    if codes.stride(-1) != 1 or codes.stride(0) % 4 or codes.data_ptr() % 4:
        _fail(f"codes strides {codes.stride()} at offset {codes.storage_offset()}",
              "pass row-contiguous codes with 4-byte aligned rows (codes.contiguous())")
    if x.stride(-1) != 1:
        x = x.contiguous()
    m, n = x.shape[0], codes.shape[0]
    words = codes.view(torch.int32)
    block_m, split = cfg.block_m(m), cfg.split_k
    gpt = cfg.block_k // group if cfg.block_k > group else 1
    if split == 1:
        out, mode = torch.empty(m, n, device=x.device, dtype=x.dtype), 0
    elif cfg.reduce is SplitReduce.ATOMIC:
        out, mode = torch.zeros(m, n, device=x.device, dtype=torch.float32), 1
    else:
        out, mode = torch.empty(split, m, n, device=x.device, dtype=torch.float32), 2
    z = zero if zero is not None else scale
    lowbit_gemv_kernel[(cdiv(n, cfg.block_n), split, cdiv(m, block_m))](
        x, x.stride(0), words, words.stride(0), scale, scale.stride(0), z, z.stride(0), out, out.stride(-2),
        m, n, k, WBITS=bits, ASYM=zero is not None, GROUP=group, PER_ROW=group >= k, GPT=gpt, BLOCK_M=block_m,
        BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT_K=split, SPLIT_MODE=mode, DOT=cfg.dot, SWIGLU=swiglu,
        STAGES=cfg.num_stages, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if mode == 1:
        return out if x.dtype == torch.float32 else out.to(x.dtype)
    if mode == 2:
        final = torch.empty(m, n, device=x.device, dtype=x.dtype)
        block = 1024
        splitk_sum_kernel[(cdiv(m * n, block),)](out, final, m * n, SPLIT_K=split, BLOCK=block)
        return final
    return out


# (block_n, block_k, num_warps) per weight bits: 64-256 bytes of codes per row and tile, 16-byte
# loads per thread, 4-16 KB of codes per tile; few registers so that several programs share an SM.
# Each thread multiplies its words with x's strided slices (scalar loads from L1): taller tiles
# (more rows per thread) spend fewer x loads per code byte, at the cost of a smaller grid.
# The last two per width (8 warps, 2x the codes per tile) keep twice the bytes in flight per
# program: session 10 (H200) found the int4 and int8 kernels taking the same time at 8b down for 2x
# different bytes, i.e. bound by loads in flight (latency), not bytes or conversions.
_FMA_TILES = {4: ((32, 256, 4), (64, 256, 4), (128, 128, 4), (128, 256, 8), (64, 512, 8)),
              8: ((32, 128, 4), (64, 128, 4), (128, 64, 4), (128, 128, 8), (64, 256, 8))}
# Single-launch tiles (no split-K): narrow and long, 16 rows of 512-1024 codes per tile. A split
# costs one or two more kernels (memset + cast, or the sum), ~1-2 us each inside a CUDA graph: as
# long as streaming a 1B layer's whole int4 weight (qkv 2048 -> 6144: 6.7 MB, ~1.7 us).
_ONE_LAUNCH_TILES = {4: ((16, 1024, 4, 1), (16, 512, 4, 3)), 8: ((16, 512, 4, 1), (16, 256, 4, 3))}
_DOT_TILES = {4: ((32, 128, 4), (64, 128, 4)), 8: ((32, 64, 4), (64, 128, 4))}


def _split_for(n: int, k: int, block_n: int, block_k: int, programs: int) -> int:
    """Largest power-of-two split that brings the grid to about `programs` and divides K's tiles."""
    split, tiles = 1, k // block_k
    while cdiv(n, block_n) * split * 2 <= programs and tiles % (split * 2) == 0:
        split *= 2
    return split


def _legal_block_k(block_k: int, k: int, group: int, bits: int) -> int:
    """Shrink block_k until it tiles K and the group (one group per tile or whole groups per tile)."""
    per_word = 32 // bits
    while block_k > per_word and (k % block_k or (group < k and group % block_k and block_k % group)):
        block_k //= 2
    return block_k


def gemv_candidates(m: int, n: int, k: int, group: int, bits: int, programs: int) -> list[GemvConfig]:
    """What the benchmark measures for M <= 16 (first = the heuristic): CUDA-core tiles with the
    split-K that fills the GPU (FP32 atomics; for the first tile also the workspace reduction and no
    split), single-launch tiles, and tensor-core tiles where legal. `programs` = the grid size to aim at (~4 per SM)."""
    out = []
    for i, (block_n, block_k, warps) in enumerate(_FMA_TILES[bits]):
        block_k = _legal_block_k(block_k, k, group, bits)
        split = _split_for(n, k, block_n, block_k, programs)
        out.append(GemvConfig(block_n, block_k, split, SplitReduce.ATOMIC, warps))
        if i < 2:  # the same through the software pipeline (cp.async, 3 stages)
            out.append(GemvConfig(block_n, block_k, split, SplitReduce.ATOMIC, warps, 3))
        if i == 0 and split > 1:  # the other reduction (one kernel less: no memset) and no split
            out += [GemvConfig(block_n, block_k, split, SplitReduce.REDUCE, warps), GemvConfig(block_n, block_k, 1)]
        if i == 0:
            out += [GemvConfig(bn, _legal_block_k(bk, k, group, bits), 1, SplitReduce.ATOMIC, w, st)
                    for bn, bk, w, st in _ONE_LAUNCH_TILES[bits]]
    dots = []
    for i, (block_n, block_k, warps) in enumerate(_DOT_TILES[bits]):
        block_k = min(block_k, group) if group < k else block_k
        if block_k * bits // 32 >= 16 and k % block_k == 0 and (group >= k or group % block_k == 0):
            split = _split_for(n, k, block_n, block_k, programs)
            dots.append(GemvConfig(block_n, block_k, split, SplitReduce.ATOMIC, warps, 3, True))
            if i == 0 and split > 1:  # the other reduction, and a single launch
                dots += [GemvConfig(block_n, block_k, split, SplitReduce.REDUCE, warps, 3, True),
                         GemvConfig(block_n, block_k, 1, SplitReduce.ATOMIC, warps, 3, True)]
    # from M = 8 the tensor cores first and only the first CUDA-core tiles (M * N * K FMAs: ~28 us
    # at M = 16 for 8B up, more than BF16 takes)
    out = dots + out[:3] if m > 4 else out + dots
    seen, unique = set(), []
    for c in out:
        if c not in seen:
            seen.add(c)
            unique.append(c)
    return unique
