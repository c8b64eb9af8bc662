"""Tensorwise FP8 casts in Triton: one scale for the whole tensor.

Two recipes share one cast kernel (`_cast_kernel`, a 2-D grid of BLOCK_M x BLOCK_K tiles):

* delayed scaling (`cast_with_amax`): the scale is known before the pass (from the amax history),
  so ONE pass reads x, writes x_fp8, optionally the transposed copy x_fp8_t, and reduces amax(|x|)
  for the history. Each program reduces its tile and combines with an int32 `atomic_max` on the bit
  pattern of |x| (exact and order independent for non-negative floats; NaN is canonicalised above
  +inf, see `fp8_triton`). Traffic per element, bf16 input: 2 B read + 1 B written (+1 B for the
  transpose) = 3 (4) B. The same work in eager torch (abs, amax, mul, clamp, to, t().contiguous())
  moves about 25 B per element through HBM.
  `delayed_cast` is the same pass as layers use it: the amax goes straight into slot 0 of the
  caster's amax history (atomic max on its bits) and program (0, 0) writes 1/scale, so a cast
  costs one launch instead of five (zero-fill, cast, reciprocal, max, copy).
* current scaling (`current_cast`): the scale depends on the amax of the WHOLE tensor, a grid-wide
  reduction. A single launch would need a grid-wide barrier, which Triton does not offer (spinning
  on a counter deadlocks when not every program is resident), so we split at the dependency:
  `_amax_kernel` (a persistent grid-stride loop, one atomic per program) then `_cast_kernel`, which
  derives the scale from the amax in every program (identical arithmetic, no host round trip) and
  lets program (0, 0) write scale_inv. Traffic, bf16: 2 + 2 read + 1 (+1) written = 5 (6) B per
  element; the second read of x comes back from HBM once x is larger than L2 (50 MB on H100).

The transposed store goes through `tl.trans`; Triton stages the tile in shared memory so both
the row-major and the column-major stores stay coalesced.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from kernels.fp8_triton import INTERPRETED, abs_bits, bits_to_float, quantize, reciprocal, scale_from_amax
from kernels.launcher import LeanKernel, cdiv
from kernels.fallback import CAST_TILE, amax_tile_count, fp8_max

# Launch configurations (benchmarks/tune_quant_kernels.py sweeps them on the GPU and prints the
# bandwidth of each; the values here are its pick on the H100).
# H100, bf16 -> e4m3 (benchmarks/results/h100_session3/tune_quant.txt): the cast+transpose runs at
# 0.89-0.91 of copy bandwidth with 32x128 tiles (0.88-0.91 with 64x128); the amax pass went from
# 0.79-0.83 (4096 elements, 4 programs per SM, 4 warps) to 0.93-0.96 with 8192 and 8 warps.
CAST = {"BLOCK_M": CAST_TILE[0], "BLOCK_K": CAST_TILE[1], "num_warps": 4}  # 4096 elements, 8 KB of bf16
AMAX = {"BLOCK": 8192, "programs_per_sm": 4, "num_warps": 8}  # elements per loop step; grid size


@triton.jit
def _amax_kernel(x_ptr, amax_bits_ptr, numel, n_iters, BLOCK: tl.constexpr):
    """Grid-stride max of |x| over a flat tensor; one int32 atomic_max per program."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    acc = tl.zeros([BLOCK], dtype=tl.int32)
    for i in range(0, n_iters):
        offs = (pid + i * nprog).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + offs, mask=offs < numel, other=0.0)
        acc = tl.maximum(acc, abs_bits(x))
    tl.atomic_max(amax_bits_ptr, tl.max(acc, axis=0))


@triton.jit
def _cast_kernel(x_ptr, q_ptr, qt_ptr, scale_ptr, amax_bits_ptr, scale_inv_ptr, M, K,
                 FMAX: tl.constexpr, IS_E5M2: tl.constexpr, SOFT: tl.constexpr, POW2: tl.constexpr,
                 SCALE_FROM_AMAX: tl.constexpr, WITH_AMAX: tl.constexpr, WITH_T: tl.constexpr,
                 WRITE_SCALE_INV: tl.constexpr, AMAX_TILES: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    """q = sat(x * scale) on one tile; optionally q^T, and the tile's amax into amax_bits: max-ed
    into amax_bits[0] (WITH_AMAX), or stored at amax_bits[tile] (AMAX_TILES: no zeroed buffer)."""
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
    x = tl.load(x_ptr + offs_m.to(tl.int64)[:, None] * K + offs_k[None, :], mask=mask, other=0.0)
    one = tl.arange(0, 1)  # scalars travel as [1] blocks (the inline-PTX helpers need blocks)
    if SCALE_FROM_AMAX:  # current scaling: amax was reduced by _amax_kernel
        scale = scale_from_amax(bits_to_float(tl.load(amax_bits_ptr + one)), FMAX, POW2)
        tl.store(scale_inv_ptr + one, reciprocal(scale), mask=(one + pid_m + pid_k) == 0)
    else:  # delayed scaling: the scale is given
        scale = tl.load(scale_ptr + one)
        if WRITE_SCALE_INV:
            tl.store(scale_inv_ptr + one, reciprocal(scale), mask=(one + pid_m + pid_k) == 0)
    if WITH_AMAX:
        tl.atomic_max(amax_bits_ptr, tl.max(tl.max(abs_bits(x), axis=1), axis=0))
    if AMAX_TILES:
        tile_max = tl.max(tl.max(abs_bits(x), axis=1), axis=0)
        tl.store(amax_bits_ptr + pid_m * tl.num_programs(1) + pid_k + one, tile_max + one * 0)
    q = quantize(x, scale[None, :], FMAX, IS_E5M2, SOFT)
    tl.store(q_ptr + offs_m.to(tl.int64)[:, None] * K + offs_k[None, :], q, mask=mask)
    if WITH_T:
        qt_offs = offs_k.to(tl.int64)[:, None] * M + offs_m[None, :]  # [BLOCK_K, BLOCK_M]
        tl.store(qt_ptr + qt_offs, tl.trans(q), mask=tl.trans(mask))


_CAST_LAUNCH = LeanKernel(_cast_kernel, INTERPRETED)
_AMAX_LAUNCH = LeanKernel(_amax_kernel, INTERPRETED)


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _amax_bits(x_hp: torch.Tensor) -> torch.Tensor:
    """int32 [1] holding the bit pattern of max |x| (NaN -> 0x7FC00000)."""
    numel, block = x_hp.numel(), AMAX["BLOCK"]
    blocks = cdiv(numel, block)
    per_sm = AMAX["programs_per_sm"]
    max_programs = 4 if INTERPRETED or not x_hp.is_cuda else per_sm * _num_sms(x_hp.device.index or 0)
    grid = min(blocks, max_programs)
    amax_bits = torch.zeros(1, dtype=torch.int32, device=x_hp.device)
    _AMAX_LAUNCH((grid,), (x_hp, amax_bits, numel, cdiv(blocks, grid)), {"BLOCK": block},
                 num_warps=AMAX["num_warps"])
    return amax_bits


def _outputs(x_hp: torch.Tensor, fp8_dtype: torch.dtype, with_transpose: bool):
    M, K = x_hp.shape
    q = torch.empty((M, K), dtype=fp8_dtype, device=x_hp.device)
    q_t = torch.empty((K, M), dtype=fp8_dtype, device=x_hp.device) if with_transpose else None
    return q, q_t


def _launch_cast(x_hp, q, q_t, scale, amax_bits, scale_inv, fp8_dtype, soft, *,
                 power_of_2=False, scale_from_amax=False, with_amax=False, write_scale_inv=False, amax_tiles=False):
    M, K = x_hp.shape
    block_m, block_k = CAST["BLOCK_M"], CAST["BLOCK_K"]
    grid = (cdiv(M, block_m), cdiv(K, block_k))
    q_u8 = q.view(torch.uint8)
    _CAST_LAUNCH(grid, (x_hp, q_u8, q_u8 if q_t is None else q_t.view(torch.uint8), scale, amax_bits, scale_inv, M, K),
                 {"FMAX": fp8_max(fp8_dtype), "IS_E5M2": fp8_dtype == torch.float8_e5m2, "SOFT": soft,
                  "POW2": power_of_2, "SCALE_FROM_AMAX": scale_from_amax, "WITH_AMAX": with_amax,
                  "WITH_T": q_t is not None, "WRITE_SCALE_INV": write_scale_inv, "AMAX_TILES": amax_tiles,
                  "BLOCK_M": block_m, "BLOCK_K": block_k},
                 num_warps=CAST["num_warps"])


def cast_with_amax(x_hp: torch.Tensor, scale: torch.Tensor, fp8_dtype: torch.dtype,
                   with_transpose: bool, soft: bool):
    """One pass: (x_fp8, x_fp8_t or None, amax fp32 [1]). Arguments already validated."""
    q, q_t = _outputs(x_hp, fp8_dtype, with_transpose)
    amax_bits = torch.zeros(1, dtype=torch.int32, device=x_hp.device)
    _launch_cast(x_hp, q, q_t, scale, amax_bits, scale, fp8_dtype, soft, with_amax=True)
    return q, q_t, amax_bits.view(torch.float32)


def cast_with_amax_tiles(x_hp: torch.Tensor, scale: torch.Tensor, fp8_dtype: torch.dtype,
                         with_transpose: bool, soft: bool):
    """One pass, nothing to zero first: (x_fp8, x_fp8_t or None, int32 bits of each tile's amax
    [amax_tile_count]). Their max is the amax; the caller reduces it where it records it (in a
    compiled graph that reduction fuses with the record: one kernel instead of a memset and a max)."""
    q, q_t = _outputs(x_hp, fp8_dtype, with_transpose)
    tiles = torch.empty(amax_tile_count(*x_hp.shape), dtype=torch.int32, device=x_hp.device)
    _launch_cast(x_hp, q, q_t, scale, tiles, scale, fp8_dtype, soft, amax_tiles=True)
    return q, q_t, tiles


def delayed_cast(x_hp: torch.Tensor, scale: torch.Tensor, amax_slot: torch.Tensor | None,
                 fp8_dtype: torch.dtype, with_transpose: bool, soft: bool):
    """One launch: the cast, amax max-accumulated into the history slot (the int32 atomic_max on
    the bit pattern is max() for non-negative floats, NaN above all), scale_inv written by one
    program. (x_fp8, x_fp8_t or None, scale_inv fp32 [1]). Arguments already validated."""
    q, q_t = _outputs(x_hp, fp8_dtype, with_transpose)
    scale_inv = torch.empty(1, dtype=torch.float32, device=x_hp.device)
    amax_bits = scale_inv if amax_slot is None else amax_slot.view(torch.int32)  # unused when None
    _launch_cast(x_hp, q, q_t, scale, amax_bits, scale_inv, fp8_dtype, soft,
                 with_amax=amax_slot is not None, write_scale_inv=True)
    return q, q_t, scale_inv


def current_cast(x_hp: torch.Tensor, fp8_dtype: torch.dtype, power_of_2: bool,
                 with_transpose: bool, soft: bool):
    """Two passes (amax, cast): (x_fp8, x_fp8_t or None, scale_inv fp32 [1])."""
    q, q_t = _outputs(x_hp, fp8_dtype, with_transpose)
    amax_bits = _amax_bits(x_hp)
    scale_inv = torch.empty(1, dtype=torch.float32, device=x_hp.device)
    _launch_cast(x_hp, q, q_t, scale_inv, amax_bits, scale_inv, fp8_dtype, soft,
                 power_of_2=power_of_2, scale_from_amax=True)
    return q, q_t, scale_inv
