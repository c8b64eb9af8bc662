"""fp8train's FP8 numerics core: formats, scaling, recipes, autograd FP8 GEMMs, module swap.

Imports only torch (and, optionally, the Triton kernels in kernels/): no trainer, Hydra,
DeepSpeed or wandb. See docs/ARCHITECTURE.md for how the packages fit together.
"""

from fp8train.numerics.backends import fp8_gemm_capability, select_backend
from fp8train.numerics.convert import ConversionReport, convert_to_fp8, describe_backend
from fp8train.numerics.formats import E4M3, E5M2, FP8Format, get_format, saturating_cast
from fp8train.numerics.graphs import make_graphed_fp8
from fp8train.numerics.grouped import FP8GroupedLinear
from fp8train.numerics.linear import FP8Linear
from fp8train.numerics.quantize import FP8Tensor
from fp8train.numerics.recipe import Recipe, RoleConfig, list_recipes, load_recipe, recipe_from_dict
from fp8train.numerics.state import after_optimizer_step, attach_optimizer, invalidate_weight_caches
from fp8train.numerics.telemetry import fp8_telemetry, set_fp8_telemetry

__all__ = [
    "E4M3", "E5M2", "FP8Format", "FP8GroupedLinear", "FP8Linear", "FP8Tensor", "ConversionReport", "Recipe", "RoleConfig",
    "after_optimizer_step", "attach_optimizer", "convert_to_fp8", "describe_backend", "fp8_gemm_capability",
    "fp8_telemetry", "get_format", "invalidate_weight_caches", "list_recipes", "load_recipe", "make_graphed_fp8",
    "recipe_from_dict", "saturating_cast", "select_backend", "set_fp8_telemetry",
]
