"""fp8train's FP8 training layer, on the quantization core (fp8train.quant).

Recipes, the role casters with their delayed-scaling state, one autograd function per GEMM family
(dense FP8Linear, MoE FP8GroupedLinear), the GEMM backends and the one backend policy, the module
swap, the per-layer precision policy (crossover tables, start-up calibration), telemetry and CUDA
graphs. Imports torch, fp8train.quant, fp8train.nn and (optionally) the
Triton kernels and Transformer Engine: no trainer, Hydra, DeepSpeed or wandb. See
docs/ARCHITECTURE.md for how the packages fit together.
"""

from fp8train.numerics.backend_policy import BackendChoice, choose_backend
from fp8train.numerics.convert import ConversionReport, convert_to_fp8, describe_backend
from fp8train.numerics.crossover import CrossoverTable, find_table, load_crossover, recipe_class, shipped_crossovers
from fp8train.numerics.cuda_graphs import make_graphed_fp8
from fp8train.numerics.gemm_backends import fp8_gemm_capability
from fp8train.numerics.grouped_linear import FP8GroupedLinear
from fp8train.numerics.linear import FP8Linear
from fp8train.numerics.precision_policy import PolicyMode, PrecisionPolicy
from fp8train.numerics.recipe import Recipe, RoleConfig, list_recipes, load_recipe, recipe_from_dict
from fp8train.numerics.step_update import (after_optimizer_step, attach_optimizer, delayed_bank, has_fp8_state,
                                           invalidate_weight_caches)
from fp8train.numerics.telemetry import fp8_telemetry, fp8_telemetry_step, set_fp8_telemetry
from fp8train.numerics.warm_start import warm_start_delayed_scales

__all__ = [
    "BackendChoice", "ConversionReport", "CrossoverTable", "FP8GroupedLinear", "FP8Linear", "PolicyMode",
    "PrecisionPolicy", "Recipe", "RoleConfig", "find_table", "load_crossover", "recipe_class", "shipped_crossovers",
    "warm_start_delayed_scales", "after_optimizer_step", "attach_optimizer", "choose_backend", "convert_to_fp8", "delayed_bank",
    "describe_backend",
    "fp8_gemm_capability", "fp8_telemetry", "fp8_telemetry_step", "has_fp8_state", "invalidate_weight_caches", "list_recipes", "load_recipe",
    "make_graphed_fp8", "recipe_from_dict", "set_fp8_telemetry",
]
