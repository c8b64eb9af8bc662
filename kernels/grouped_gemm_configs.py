"""Tile configurations of the grouped FP8 GEMMs: a fixed table, no autotuning.

A launch never benchmarks and never syncs, so it is the same inside a CUDA graph or torch.compile.
The table is keyed by (form, scaling, shape class, fast accumulation); the shape class comes from
static sizes only (token counts per expert live on the device; their MEAN, rows / experts, does not):

    WIDE          output columns N a multiple of 256 (2048, 7168): 128 x 256 tiles
    NARROW        other N (1408 = 11 x 128): 128 x 128, no half-empty 256-wide tile
    *_SHORT       experts form with fewer than SHORT_GROUP_ROWS rows per expert on average: 64-row
                  tiles. A ragged group wastes half a tile of rows on average, BM/2 per expert:
                  128-row tiles waste 6.3% at 1024 rows per expert (the 8192-token top-2 layer),
                  64-row tiles 3.1%; at 4096 rows (16384 tokens top-8 of 32) 128 rows waste 1.6%.

Register budgets (sm_90, Triton 3.6, scripts/compile_grouped_gemm.py): a 128 x 256 FP32 accumulator
takes 128 registers per thread with 8 warps, so fast tensorwise fits (~185-205, no spill) but a
second FP32 tile does not: promoted tensorwise (max_num_imprecise_acc) and blockwise (the chunk's
dot before its scales) use 128 x 128 (173-255 registers, no spill). Triton waits for each blockwise
chunk's wgmma before promoting it; 64 x 128 tiles with 4 warps and two programs per SM let one
program's promotion overlap the other's tensor-core work.

`benchmarks/bench_grouped_gemm.py --sweep` times candidates per GEMM on the GPU and prints the best;
its picks replace the entries below. The interpreter gets tiny tiles so CPU tests stay fast.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import Enum

from fp8train.quant.schemes import BLOCK  # DeepSeek-V3 scale tile edge
SHORT_GROUP_ROWS = 1536  # below this mean rows per expert, 64-row tiles (128 would waste > 4%)


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
    WIDE_SHORT = "wide_short"
    NARROW_SHORT = "narrow_short"


@dataclass(frozen=True)
class TileConfig:
    """One launch configuration. bk: contraction chunk (128 for blockwise); tail_k: chunk of the
    tokens form's ragged tail (tensorwise, >= 32 on the GPU; masked pointer loads); use_tma: TMA descriptor loads where
    the layout allows (16-byte aligned base and row strides), else masked pointer loads; flatten:
    fuse the tile and K loops (Triton's tl.range(flatten=True)); programs_per_sm: persistent grid."""

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
                f"{' tma' if self.use_tma else ' ptr'}{' flat' if self.flatten else ''} tail{self.tail_k}"
                f" p{self.programs_per_sm}")


# flatten: the experts form's tile and K loops fuse (Triton overlaps a tile's epilogue with the next
# tile's loads). The tokens form's flat (tile, chunk) loop (kernels/grouped_gemm_flat.py) stays
# available (flatten=True with 128-aligned groups) but is not the default: see _TOKENS below.
_WIDE = TileConfig(bm=128, bn=256, num_stages=3, flatten=True)
_SQUARE = TileConfig(bm=128, bn=128, num_stages=4, flatten=True)
_WIDE_SHORT = TileConfig(bm=64, bn=256, num_stages=4, flatten=True)
_NARROW_SHORT = TileConfig(bm=64, bn=128, num_warps=4, num_stages=4, programs_per_sm=2, flatten=True)
# Promoted accumulation at long groups (16384 tokens top-8 of 32 experts, H200, session 8 sweep,
# benchmarks/results/h200x4_session8/moe_sweep_large): 128 x 256 with 3 stages beats 128 x 128 for
# grad_input (gate|up 4.07 vs 4.57 ms, down 4.24 vs 4.77 ms: 907-945 vs 807-843 TFLOP/s) although a
# second FP32 tile of that size does not fit the registers (the compiler spills a little; measured
# faster anyway). The tokens form with 128-aligned groups: 128 x 256 nested, 3 stages (gate|up 4.01
# vs 4.16 ms, down 3.81 vs 4.06 ms: 960-1009 TFLOP/s).
_PROMOTED_WIDE = TileConfig(bm=128, bn=256, num_stages=3, flatten=True, group_m=4)
_TOKENS_ALIGNED_WIDE = TileConfig(bm=128, bn=256, num_stages=3)
_FAST = {ShapeClass.WIDE: _WIDE, ShapeClass.NARROW: _SQUARE, ShapeClass.WIDE_SHORT: _WIDE_SHORT,
         ShapeClass.NARROW_SHORT: _NARROW_SHORT}
_PROMOTED = {ShapeClass.WIDE: _PROMOTED_WIDE, ShapeClass.NARROW: _SQUARE, ShapeClass.WIDE_SHORT: _WIDE_SHORT,
             ShapeClass.NARROW_SHORT: _NARROW_SHORT}
_BLOCKWISE = {ShapeClass.WIDE: _SQUARE, ShapeClass.NARROW: _SQUARE, ShapeClass.WIDE_SHORT: _NARROW_SHORT,
              ShapeClass.NARROW_SHORT: _NARROW_SHORT}
# The tokens form (grad_weight) measured on an H200 (scripts/gpu/grouped_probe.py, 8192 x top-2 of
# 16 experts, 1408 x 2048): nested loops beat the flat loop (aligned promoted 0.262 vs 0.422 ms,
# blockwise 0.315 vs 0.582 ms), and with ragged groups (pointer loads) 128 x 128 tiles beat 128 x 256
# (0.66 vs 3.98 ms): one 128 x 128 nested-loop config for every tokens-form GEMM.
_TOKENS = replace(_SQUARE, flatten=False)
CONFIGS: dict[tuple[Form, Scaling, ShapeClass, bool], TileConfig] = {
    # (form, scaling, shape class, fast accumulation) -> config; the tokens form has no *_SHORT class
    **{(Form.EXPERTS, Scaling.TENSORWISE, shape, True): cfg for shape, cfg in _FAST.items()},
    **{(Form.EXPERTS, Scaling.TENSORWISE, shape, False): cfg for shape, cfg in _PROMOTED.items()},
    **{(Form.EXPERTS, Scaling.BLOCKWISE, shape, False): cfg for shape, cfg in _BLOCKWISE.items()},
    **{(Form.TOKENS, Scaling.TENSORWISE, shape, fast): _TOKENS for shape in (ShapeClass.WIDE, ShapeClass.NARROW)
       for fast in (False, True)},
    **{(Form.TOKENS, Scaling.BLOCKWISE, shape, False): _TOKENS for shape in (ShapeClass.WIDE, ShapeClass.NARROW)},
}
_TINY = TileConfig(bm=32, bn=64, bk=64, group_m=2, num_warps=4, num_stages=2, tail_k=16, programs_per_sm=3)
INTERPRETER_CONFIGS = {  # (form, scaling) -> config. The interpreter asserts 16-byte aligned TMA
    # coordinates, which ragged token groups break (the hardware takes any coordinate), so the tokens
    # form defaults to pointer loads there; tests ask for TMA explicitly with 16-aligned groups.
    (Form.EXPERTS, Scaling.TENSORWISE): _TINY,
    (Form.EXPERTS, Scaling.BLOCKWISE): replace(_TINY, bk=BLOCK),
    (Form.TOKENS, Scaling.TENSORWISE): replace(_TINY, use_tma=False),
    (Form.TOKENS, Scaling.BLOCKWISE): replace(_TINY, bk=BLOCK),
}


def shape_class(form: Form, n: int, rows_per_group: float) -> ShapeClass:
    """The class of a GEMM with N output columns and mean rows (experts form) or tokens (tokens form)
    per expert; the tokens form has no *_SHORT class in CONFIGS."""
    wide = n % 256 == 0
    if form is Form.EXPERTS and rows_per_group < SHORT_GROUP_ROWS:
        return ShapeClass.WIDE_SHORT if wide else ShapeClass.NARROW_SHORT
    return ShapeClass.WIDE if wide else ShapeClass.NARROW


def pick_config(form: Form, scaling: Scaling, n: int, rows_per_group: float, fast_accum: bool,
                interpreted: bool, out_bytes: int = 2, groups_aligned: bool = False) -> TileConfig:
    """The table's config, its pipeline stages fitted to shared memory with an output element of
    `out_bytes` (interpreter: the tiny CPU config). `groups_aligned`: the tokens form reads
    128-aligned groups through TMA; with long groups and wide N it takes _TOKENS_ALIGNED_WIDE where
    that fits shared memory with all its stages (an FP32 output does not: 128 x 128 stays)."""
    if interpreted:
        return INTERPRETER_CONFIGS[(form, scaling)]
    fast = fast_accum and scaling is Scaling.TENSORWISE
    shape = shape_class(form, n, rows_per_group)
    if (form is Form.TOKENS and scaling is Scaling.TENSORWISE and groups_aligned and shape is ShapeClass.WIDE
            and rows_per_group >= SHORT_GROUP_ROWS and smem_bytes(_TOKENS_ALIGNED_WIDE, out_bytes) <= SMEM_BYTES):
        return _TOKENS_ALIGNED_WIDE
    return fit_smem(CONFIGS[(form, scaling, shape, fast)], out_bytes)


SMEM_BYTES = 226 * 1024  # sm_90: 232448 bytes per block (227 KiB), less a margin for barriers


def smem_bytes(config: TileConfig, out_bytes: int) -> int:
    """Shared memory of a launch: num_stages FP8 operand tiles, plus the epilogue's [bm, bn] output
    tile (Triton converts the accumulator's layout through shared memory before the store)."""
    return config.num_stages * (config.bm + config.bn) * config.bk + config.bm * config.bn * out_bytes


def fit_smem(config: TileConfig, out_bytes: int) -> TileConfig:
    """`config` with fewer pipeline stages where its tiles and an FP32 (4-byte) output tile would
    not fit: 128 x 256 tiles with 3 stages need 278552 bytes with an FP32 output (the first H200 run)."""
    while config.num_stages > 1 and smem_bytes(config, out_bytes) > SMEM_BYTES:
        config = replace(config, num_stages=config.num_stages - 1)
    return config


def with_overrides(config: TileConfig, **fields) -> TileConfig:
    """A copy of `config` with some fields changed (benchmarks and tests)."""
    return replace(config, **fields)
