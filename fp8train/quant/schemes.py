"""THE table: how each FP8-training scaling choice casts an operand, and which kernel does it.

A recipe names a scaling per operand role (`delayed`, `current`, `rowwise`, `blockwise`); this
table turns that name into a `CastScheme`: the scaling mode, the granularity of the stored operand
("rows": contraction along its last dim), whether the transposed operand ("cols") reuses the same
codes, and the Triton operations (kernels/ops.py) that produce rows, both, or only cols in one pass.

| recipe scaling | operand        | mode    | granularity | GEMM class | transposed copy     | kernels (rows / both / cols)                         |
|----------------|----------------|---------|-------------|------------|---------------------|------------------------------------------------------|
| delayed        | any            | DELAYED | tensor      | tensorwise | same codes          | delayed_cast (with_transpose for both)               |
| current        | any            | CURRENT | tensor      | tensorwise | same codes          | current_cast (with_transpose for both)               |
| rowwise        | any            | CURRENT | row         | rowwise    | re-quantized        | torch reference                                      |
| blockwise      | weight         | CURRENT | block 128   | blockwise  | same codes          | quantize_128x128 / quantize_128x128_both / -          |
| blockwise      | input, grad    | CURRENT | tile 1x128  | blockwise  | re-quantized (128x1)| quantize_1x128 / quantize_1x128_both / quantize_1x128_t |

The operands of one GEMM must share a GEMM class (a tensor-core GEMM scales both operands the same
way). A new scaling (MXFP8 1x32 tiles with E8M0 scales, say) is one new row here and one kernel.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from fp8train.quant.config_values import parse_choice
from fp8train.quant.granularity import Granularity
from fp8train.quant.scaling import ScalingMode

BLOCK = 128  # DeepSeek-V3's tile and block edge


class RecipeScaling(Enum):
    DELAYED = "delayed"
    CURRENT = "current"
    ROWWISE = "rowwise"
    BLOCKWISE = "blockwise"


class GemmClass(Enum):
    """Scaling class shared by the two operands of one GEMM."""

    TENSORWISE = "tensorwise"
    ROWWISE = "rowwise"
    BLOCKWISE = "blockwise"


@dataclass(frozen=True)
class CastScheme:
    mode: ScalingMode
    granularity: Granularity
    gemm_class: GemmClass
    kernel_rows: str | None = None  # kernels.ops function for the rows operand alone
    kernel_both: str | None = None  # ... for rows and cols from one read
    kernel_cols: str | None = None  # ... for cols alone (non-transposable granularities)

    @property
    def reuses_transpose(self) -> bool:
        """Do cols reuse the rows' codes (a 1-byte transposed copy) instead of a new quantization?"""
        return self.granularity.transposable


_TENSOR = Granularity.tensor()
SCHEMES: dict[tuple[RecipeScaling, bool], CastScheme] = {}
for _is_weight in (False, True):
    SCHEMES[(RecipeScaling.DELAYED, _is_weight)] = CastScheme(
        ScalingMode.DELAYED, _TENSOR, GemmClass.TENSORWISE, "delayed_cast", "delayed_cast")
    SCHEMES[(RecipeScaling.CURRENT, _is_weight)] = CastScheme(
        ScalingMode.CURRENT, _TENSOR, GemmClass.TENSORWISE, "current_cast", "current_cast")
    SCHEMES[(RecipeScaling.ROWWISE, _is_weight)] = CastScheme(
        ScalingMode.CURRENT, Granularity.row(), GemmClass.ROWWISE)
SCHEMES[(RecipeScaling.BLOCKWISE, True)] = CastScheme(
    ScalingMode.CURRENT, Granularity.block(BLOCK), GemmClass.BLOCKWISE, "quantize_128x128", "quantize_128x128_both")
SCHEMES[(RecipeScaling.BLOCKWISE, False)] = CastScheme(
    ScalingMode.CURRENT, Granularity.tile(BLOCK), GemmClass.BLOCKWISE, "quantize_1x128", "quantize_1x128_both",
    "quantize_1x128_t")


def recipe_scaling(name: str, where: str = "scaling") -> RecipeScaling:
    """The enum for a recipe's scaling string, or ValueError naming the allowed values."""
    return parse_choice(RecipeScaling, name, where)


def scheme_for(scaling: RecipeScaling, role: str) -> CastScheme:
    """The cast scheme of one operand role ("input", "weight", "grad_output")."""
    return SCHEMES[(scaling, role == "weight")]
