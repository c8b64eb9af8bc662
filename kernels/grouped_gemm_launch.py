"""Launchers of the grouped FP8 GEMMs (kernels/grouped_gemm.py): grid, TMA allocator, arguments.

Persistent grids: `programs_per_sm` programs per SM, capped by an upper bound of the tile count
computable on the host (the real count lives on the device, with the group offsets). Launches go
through LeanKernel (kernels/launcher.py): no JIT dispatch on the host after the first call.
"""

from __future__ import annotations

import functools

import torch

from kernels.grouped_gemm_configs import Scaling, TileConfig
from kernels.launcher import LeanKernel, cdiv, next_power_of_2


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
def _launchers(interpreted: bool) -> dict[str, LeanKernel]:
    from kernels import grouped_gemm, grouped_gemm_flat  # noqa: PLC0415 (decorating needs Triton: first use)

    kernels = {"experts": grouped_gemm.experts_kernel, "tokens": grouped_gemm.tokens_kernel,
               "tokens_flat": grouped_gemm_flat.tokens_kernel_flat}
    return {name: LeanKernel(fn, interpreted) for name, fn in kernels.items()}


def _tiling(config: TileConfig, scaling: Scaling, fast_accum: bool, use_tma: bool) -> dict:
    blockwise = scaling is Scaling.BLOCKWISE
    return {"BLOCKWISE": blockwise, "FAST_ACCUM": fast_accum, "USE_TMA": use_tma, "FLATTEN": config.flatten,
            "BM": config.bm, "BN": config.bn, "BK": config.bk}


def launch_experts(a, b, out, offs, sa, sb, sa_strides, sb_strides, scaling: Scaling, fast_accum: bool,
                   config: TileConfig, interpreted: bool) -> None:
    """out [T, N] <- the experts form. sa_strides (m, k) and sb_strides (e, n, k) in elements."""
    T, K = a.shape
    E, N, _ = b.shape
    use_tma = config.use_tma and tma_layout_ok((a, a.stride(0)), (b, b.stride(0)), (b, b.stride(1)))
    if use_tma and not interpreted:
        ensure_tma_allocator()
    upper = (cdiv(T, config.bm) + E + 1) * cdiv(N, config.bn)
    grid = (max(1, min(num_programs(config, a.device, interpreted), upper)),)
    args = (a, b, out, offs, sa, sb, T, N, K, E, a.stride(0), b.stride(0), b.stride(1), out.stride(0), *sa_strides,
            *sb_strides)
    constexprs = {**_tiling(config, scaling, fast_accum, use_tma), "GROUP_M": config.group_m,
                  "NUM_STAGES": config.num_stages, "E_POW2": next_power_of_2(E + 1)}
    _launchers(interpreted)["experts"](grid, args, constexprs, num_warps=config.num_warps)


def launch_tokens(a, b, out, offs, sa, sb, sa_strides, sb_strides, scaling: Scaling, fast_accum: bool,
                  config: TileConfig, interpreted: bool, groups_aligned: bool = False) -> None:
    """out [E, M, N] <- the tokens form. sa_strides (m, t), sb_strides (n, t) in elements. With
    groups_aligned (every offset a multiple of config.bk) and config.flatten: the flat kernel."""
    M, T = a.shape
    N = b.shape[0]
    E = offs.shape[0]
    # TMA boxes must start at 16-byte aligned token coordinates: a ragged group boundary inside a
    # box start killed the kernel with an illegal instruction on an H200 (scripts/gpu/grouped_probe.py),
    # so only 128-aligned groups (blockwise; tensorwise with groups_aligned) read through TMA
    use_tma = config.use_tma and groups_aligned and tma_layout_ok((a, a.stride(0)), (b, b.stride(0)))
    if use_tma and not interpreted:
        ensure_tma_allocator()
    tiles = E * cdiv(M, config.bm) * cdiv(N, config.bn)
    grid = (max(1, min(num_programs(config, a.device, interpreted), tiles)),)
    args = (a, b, out, offs, sa, sb, M, N, T, E, a.stride(0), b.stride(0), out.stride(0), out.stride(1),
            *sa_strides, *sb_strides)
    tiling = _tiling(config, scaling, fast_accum, use_tma)
    if groups_aligned and config.flatten:
        del tiling["FLATTEN"]
        constexprs = {**tiling, "GROUP_M": config.group_m, "NUM_STAGES": config.num_stages,
                      "E_POW2": next_power_of_2(E)}
        _launchers(interpreted)["tokens_flat"](grid, args, constexprs, num_warps=config.num_warps)
        return
    constexprs = {**tiling, "TAIL_K": config.tail_k, "GROUP_M": config.group_m, "NUM_STAGES": config.num_stages}
    _launchers(interpreted)["tokens"](grid, args, constexprs, num_warps=config.num_warps)
