"""fp8train's FP8 training layer, on the quantization core (fp8train.quant).

Recipes, the role casters with their delayed-scaling state, one autograd function per GEMM family
(dense FP8Linear, MoE FP8GroupedLinear), the GEMM backends and the one backend policy, the module
swap, telemetry and CUDA graphs. Imports torch, fp8train.quant, fp8train.nn and (optionally) the
Triton kernels and Transformer Engine: no trainer, Hydra, DeepSpeed or wandb. See
docs/ARCHITECTURE.md for how the packages fit together.
"""

from fp8train.numerics.backend_policy import BackendChoice, choose_backend
from fp8train.numerics.convert import ConversionReport, convert_to_fp8, describe_backend
from fp8train.numerics.cuda_graphs import make_graphed_fp8
from fp8train.numerics.gemm_backends import fp8_gemm_capability
from fp8train.numerics.grouped_linear import FP8GroupedLinear
from fp8train.numerics.linear import FP8Linear
from fp8train.numerics.recipe import Recipe, RoleConfig, list_recipes, load_recipe, recipe_from_dict
from fp8train.numerics.step_update import after_optimizer_step, attach_optimizer, invalidate_weight_caches
from fp8train.numerics.telemetry import fp8_telemetry, set_fp8_telemetry

__all__ = [
    "BackendChoice", "ConversionReport", "FP8GroupedLinear", "FP8Linear", "Recipe", "RoleConfig",
    "after_optimizer_step", "attach_optimizer", "choose_backend", "convert_to_fp8", "describe_backend",
    "fp8_gemm_capability", "fp8_telemetry", "invalidate_weight_caches", "list_recipes", "load_recipe",
    "make_graphed_fp8", "recipe_from_dict", "set_fp8_telemetry",
]
