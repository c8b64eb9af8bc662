"""Launch configurations and launchers of the grouped FP8 GEMMs (kernels/grouped_gemm.py).

No autotuning: a fixed table keyed by (form, scaling, shape class) picks the tile shape, so a
launch never benchmarks, never syncs and is the same inside a CUDA graph or torch.compile.
`benchmarks/bench_grouped_gemm.py --sweep` times candidate configs on the GPU and prints the best
per shape; its picks go into CONFIGS. Shape classes, from the static dimensions only (token
counts live on the device):

    WIDE    output columns N a multiple of 256 (e.g. 2048, 7168): 128 x 256 tiles
    NARROW  anything else (e.g. 1408 = 11 x 128): 128 x 128 tiles, no half-empty 256 tile

Blockwise keeps 128 x 128: its promotion holds a second FP32 tile (the chunk's dot) in registers,
and 128 x 256 would spill. The interpreter gets tiny tiles (INTERPRETER_CONFIGS) so CPU tests stay
fast. Persistent grids: `programs_per_sm` programs per SM (1: the big tiles fill shared memory).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from enum import Enum

import torch

from kernels.launcher import LeanKernel, cdiv, next_power_of_2

BLOCK = 128  # DeepSeek-V3 scale tile edge


class Form(Enum):
    """Which grouped GEMM: rows grouped (output, grad_input) or the contraction grouped (grad_weight)."""

    EXPERTS = "experts"
    TOKENS = "tokens"


class Scaling(Enum):
    TENSORWISE = "tensorwise"
    BLOCKWISE = "blockwise"


class ShapeClass(Enum):
    WIDE = "wide"
    NARROW = "narrow"


@dataclass(frozen=True)
class TileConfig:
    """One launch configuration. bk is the contraction chunk (128 for blockwise); tail_k the chunk
    of the tokens form's ragged tail (tensorwise); use_tma: TMA descriptor loads when the layout
    allows them (16-byte aligned base and row strides), else masked pointer loads."""

    bm: int
    bn: int
    bk: int = 128
    group_m: int = 8
    num_warps: int = 8
    num_stages: int = 4
    use_tma: bool = True
    flatten: bool = False
    tail_k: int = 32
    programs_per_sm: int = 1

    def __str__(self) -> str:
        return (f"{self.bm}x{self.bn}x{self.bk} g{self.group_m} w{self.num_warps} s{self.num_stages}"
                f"{' tma' if self.use_tma else ' ptr'}{' flat' if self.flatten else ''} tail{self.tail_k}")


_WIDE = TileConfig(bm=128, bn=256, num_stages=3)      # 187-205 registers, no spill (sm_90, Triton 3.6)
_NARROW = TileConfig(bm=128, bn=128, num_stages=4)    # also every promoted tensorwise GEMM: a second
_BLOCK = TileConfig(bm=128, bn=128, num_stages=4)     # FP32 tile at 128 x 256 spills
CONFIGS: dict[tuple[Form, Scaling, ShapeClass, bool], TileConfig] = {
    # (form, scaling, shape class, fast accumulation) -> config
    **{(form, Scaling.TENSORWISE, ShapeClass.WIDE, True): _WIDE for form in Form},
    **{(form, Scaling.TENSORWISE, ShapeClass.NARROW, True): _NARROW for form in Form},
    **{(form, Scaling.TENSORWISE, shape, False): _NARROW for form in Form for shape in ShapeClass},
    **{(form, Scaling.BLOCKWISE, shape, False): _BLOCK for form in Form for shape in ShapeClass},
}
INTERPRETER_CONFIGS = {
    Scaling.TENSORWISE: TileConfig(bm=32, bn=64, bk=64, group_m=2, num_warps=4, num_stages=2, tail_k=16,
                                   programs_per_sm=3),
    Scaling.BLOCKWISE: TileConfig(bm=32, bn=64, bk=BLOCK, group_m=2, num_warps=4, num_stages=2,
                                  programs_per_sm=3),
}


def shape_class(n: int) -> ShapeClass:
    return ShapeClass.WIDE if n % 256 == 0 else ShapeClass.NARROW


def pick_config(form: Form, scaling: Scaling, n: int, fast_accum: bool, interpreted: bool) -> TileConfig:
    """The table's config for output width n (interpreter: the tiny CPU config)."""
    if interpreted:
        return INTERPRETER_CONFIGS[scaling]
    return CONFIGS[(form, scaling, shape_class(n), fast_accum and scaling is Scaling.TENSORWISE)]


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_programs(config: TileConfig, device: torch.device, interpreted: bool) -> int:
    """Persistent grid size (the interpreter: programs_per_sm programs, to exercise the tile loop)."""
    if interpreted or device.type != "cuda":
        return config.programs_per_sm
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _sm_count(index) * config.programs_per_sm


def _scratch(size: int, alignment: int, stream) -> torch.Tensor:
    """Global scratch for device-side TMA descriptors (128 bytes per descriptor and program)."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


def ensure_tma_allocator() -> None:
    """Install `_scratch` as Triton's allocator unless the caller set one. Triton keeps it in a
    ContextVar, which a new thread (autograd's backward thread) does not inherit: check per launch."""
    import triton  # noqa: PLC0415 (kernels import triton lazily)
    from triton.runtime import _allocation  # noqa: PLC0415

    current = getattr(_allocation, "_allocator", None)
    null = getattr(_allocation, "NullAllocator", None)
    if current is None or null is None or isinstance(current.get(), null):
        triton.set_allocator(_scratch)


def tma_layout_ok(*operands: tuple[torch.Tensor, int]) -> bool:
    """TMA needs 16-byte aligned base addresses and row strides: (tensor, row stride in elements)."""
    return all(t.data_ptr() % 16 == 0 and (stride * t.element_size()) % 16 == 0 for t, stride in operands)


@functools.lru_cache(maxsize=None)
def _launchers(interpreted: bool) -> tuple[LeanKernel, LeanKernel]:
    from kernels import grouped_gemm  # noqa: PLC0415 (decorating needs Triton: import on first use)

    return LeanKernel(grouped_gemm.experts_kernel, interpreted), LeanKernel(grouped_gemm.tokens_kernel, interpreted)


def _tiling(config: TileConfig, scaling: Scaling, fast_accum: bool, use_tma: bool) -> dict:
    blockwise = scaling is Scaling.BLOCKWISE
    return {"BLOCKWISE": blockwise, "FAST_ACCUM": fast_accum, "USE_TMA": use_tma, "FLATTEN": config.flatten,
            "BM": config.bm, "BN": config.bn, "BK": config.bk}


def launch_experts(a, b, out, offs, sa, sb, sa_strides, sb_strides, scaling: Scaling, fast_accum: bool,
                   config: TileConfig, interpreted: bool) -> None:
    """out [T, N] <- the experts form. sa_strides (m, k) and sb_strides (e, n, k) in elements."""
    T, K = a.shape
    E, N, _ = b.shape
    use_tma = config.use_tma and tma_layout_ok((a, a.stride(0)), (b, K))
    if use_tma and not interpreted:
        ensure_tma_allocator()
    upper = (cdiv(T, config.bm) + E + 1) * cdiv(N, config.bn)
    grid = (max(1, min(num_programs(config, a.device, interpreted), upper)),)
    args = (a, b, out, offs, sa, sb, T, N, K, E, a.stride(0), out.stride(0), *sa_strides, *sb_strides)
    constexprs = {**_tiling(config, scaling, fast_accum, use_tma), "GROUP_M": config.group_m,
                  "NUM_STAGES": config.num_stages, "E_POW2": next_power_of_2(E + 1)}
    _launchers(interpreted)[0](grid, args, constexprs, num_warps=config.num_warps)


def launch_tokens(a, b, out, offs, sa, sb, sa_strides, sb_strides, scaling: Scaling, fast_accum: bool,
                  config: TileConfig, interpreted: bool) -> None:
    """out [E, M, N] <- the tokens form. sa_strides (m, t), sb_strides (n, t) in elements."""
    M, T = a.shape
    N = b.shape[0]
    E = offs.shape[0]
    use_tma = config.use_tma and tma_layout_ok((a, a.stride(0)), (b, b.stride(0)))
    if use_tma and not interpreted:
        ensure_tma_allocator()
    tiles = E * cdiv(M, config.bm) * cdiv(N, config.bn)
    grid = (max(1, min(num_programs(config, a.device, interpreted), tiles)),)
    args = (a, b, out, offs, sa, sb, M, N, T, E, a.stride(0), b.stride(0), out.stride(0), out.stride(1),
            *sa_strides, *sb_strides)
    constexprs = {**_tiling(config, scaling, fast_accum, use_tma), "TAIL_K": config.tail_k,
                  "GROUP_M": config.group_m, "NUM_STAGES": config.num_stages}
    _launchers(interpreted)[1](grid, args, constexprs, num_warps=config.num_warps)


def with_overrides(config: TileConfig, **fields) -> TileConfig:
    """A copy of `config` with some fields changed (benchmarks and tests)."""
    return replace(config, **fields)
