"""Models for fp8train: a Llama-style dense decoder and DeepSeek-style MoE, in plain high precision.

Everything that should run in FP8 is a bias-free nn.Linear or a GroupedLinear (routed experts);
`fp8train.numerics.convert_to_fp8` swaps them afterwards. Names matter for that swap: `embed`,
`lm_head` and `router` are skipped (kept high precision); attention and MLP projections convert.

    config = model_config("tiny", vocab_size=32000, max_seq_len=1024)
    model = build_model(config)
    loss = model(input_ids, labels)          # scalar; model.last_metrics holds MoE statistics
"""

from fp8train.models.configs import MODEL_SIZES, build_model, model_config
from fp8train.models.counting import count_parameters, flops_per_token
from fp8train.models.dispatch import DispatchPlan, combine, dispatch
from fp8train.nn.grouped_linear import GroupedLinear
from fp8train.models.llama import Transformer
from fp8train.models.model_config import ModelConfig
from fp8train.models.moe import MoE, MoEConfig

__all__ = [
    "MODEL_SIZES", "ModelConfig", "MoEConfig", "model_config", "build_model", "Transformer",
    "MoE", "GroupedLinear", "dispatch", "combine", "DispatchPlan", "count_parameters",
    "flops_per_token",
]
