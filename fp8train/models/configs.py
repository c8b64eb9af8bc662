"""Named model sizes and the model factory.

`MODEL_SIZES` holds plain values (the Hydra layer can show and override them); `model_config`
resolves a name plus the data-dependent fields (vocab_size, max_seq_len) and overrides into a
validated, frozen `ModelConfig`. Parameter counts below are for a 32,000-token vocabulary with an
untied lm_head (see counting.count_parameters):

    name        non-embedding    + embed & head    total
    tiny         0.4M             8.2M             8.6M    CPU tests (well under 1 s per 8x128 step)
    small        3.1M            16.4M            19.5M    CPU / quick GPU smoke runs
    125m        85.0M            49.2M           134.1M    GPT-2-small class (d 768, 12 layers)
    350m       308.3M            65.5M           373.9M
    1b         822.0M           131.1M           953.2M    all GEMM dims multiples of 128
    moe_tiny     0.7M             8.2M             8.9M    CPU MoE tests (8 experts, top-2)
    moe_small   11.4M            16.4M            27.8M
    moe_1b     967.7M            65.5M          1033.2M    ~258M active per token; fits one H100
    moe_2b    1666.4M           131.1M          1797.5M    ~741M active; FP8 MoE end to end on one H100

Every GEMM dimension of every size (d_model, heads * head_dim, KV heads * head_dim, FFN and expert
hidden) is a multiple of 128, so blockwise FP8 recipes (128-wide tiles) convert every projection.
GQA (2 KV heads) starts at `small`.

MoE sizes follow DeepSeek-V3: fine-grained experts, shared experts, sigmoid scores with top-k
renormalisation, aux-loss-free bias balancing plus a tiny sequence-wise aux loss, first layer dense.
`moe_2b` is the end-to-end FP8 MoE size (issue #11, conf/experiment/gpu_moe.yaml): 16 experts of
hidden 2048, top-4 of d 2048, so at 8 x 2048 tokens per micro-batch each expert GEMM is 65536 x 2048
x 2048 and the experts carry ~70% of the FLOPs (moe_1b's 64 experts of hidden 256 are too small
for FP8 to pay).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from fp8train.models.llama import Transformer
from fp8train.models.model_config import ModelConfig
from fp8train.models.moe import MoEConfig

_DEEPSEEK_V3_ROUTING = dict(score_func="sigmoid", norm_topk_prob=True, balancing="bias",
                            aux_loss_coef=1e-4, aux_loss_scope="sequence", first_k_dense=1)

MODEL_SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(d_model=128, n_layers=2, n_heads=4, n_kv_heads=4, ffn_hidden=384),
    "small": dict(d_model=256, n_layers=4, n_heads=4, n_kv_heads=2, ffn_hidden=768),
    "125m": dict(d_model=768, n_layers=12, n_heads=12, n_kv_heads=12, ffn_hidden=2048),
    "350m": dict(d_model=1024, n_layers=24, n_heads=16, n_kv_heads=16, ffn_hidden=2816),
    "1b": dict(d_model=2048, n_layers=16, n_heads=16, n_kv_heads=16, ffn_hidden=5632),
    "moe_tiny": dict(d_model=128, n_layers=2, n_heads=4, n_kv_heads=4, ffn_hidden=384,
                     moe=dict(n_routed_experts=8, n_shared_experts=1, top_k=2,
                              expert_ffn_hidden=128, **_DEEPSEEK_V3_ROUTING)),
    "moe_small": dict(d_model=256, n_layers=4, n_heads=4, n_kv_heads=2, ffn_hidden=768,
                      moe=dict(n_routed_experts=16, n_shared_experts=1, top_k=2,
                               expert_ffn_hidden=256, **_DEEPSEEK_V3_ROUTING)),
    "moe_1b": dict(d_model=1024, n_layers=18, n_heads=16, n_kv_heads=16, ffn_hidden=2816,
                   moe=dict(n_routed_experts=64, n_shared_experts=2, top_k=6,
                            expert_ffn_hidden=256, **_DEEPSEEK_V3_ROUTING)),
    "moe_2b": dict(d_model=2048, n_layers=8, n_heads=16, n_kv_heads=16, ffn_hidden=5632,
                   moe=dict(n_routed_experts=16, n_shared_experts=1, top_k=4,
                            expert_ffn_hidden=2048, **_DEEPSEEK_V3_ROUTING)),
    # few wide layers: the expert GEMMs of a DeepSeek-sized model (d 4096, ~4096 rows per expert at
    # 16k tokens) in a model that trains on one H100; moe_2b's d 2048 is where FP8 experts pay least
    "moe_2b_wide": dict(d_model=4096, n_layers=4, n_heads=32, n_kv_heads=8, ffn_hidden=11008,
                        moe=dict(n_routed_experts=16, n_shared_experts=1, top_k=4,
                                 expert_ffn_hidden=2048, **_DEEPSEEK_V3_ROUTING)),
}

_SIZE_LEVEL_FIELDS = {f.name for f in dataclasses.fields(ModelConfig)} - {"vocab_size",
                                                                          "max_seq_len"}


def model_config(name: str, vocab_size: int, max_seq_len: int, **overrides: Any) -> ModelConfig:
    """ModelConfig for a named size. Overrides replace size fields; `moe` may be a MoEConfig,
    None (dense), or a dict merged over the size's MoE settings."""
    if name not in MODEL_SIZES:
        raise ValueError(f"unknown model size {name!r}; known sizes: {sorted(MODEL_SIZES)}")
    unknown = set(overrides) - _SIZE_LEVEL_FIELDS
    if unknown:
        raise ValueError(f"unknown model override(s) {sorted(unknown)}; "
                         f"allowed: {sorted(_SIZE_LEVEL_FIELDS)}")
    fields = dict(MODEL_SIZES[name])
    moe_override = overrides.pop("moe", fields.get("moe"))
    fields.update(overrides)
    fields["moe"] = _resolve_moe(fields.get("moe"), moe_override)
    return ModelConfig(vocab_size=vocab_size, max_seq_len=max_seq_len, **fields)


def _resolve_moe(size_moe: dict | None, override: Any) -> MoEConfig | None:
    if override is None or isinstance(override, MoEConfig):
        return override
    if not isinstance(override, dict):
        raise ValueError(f"moe override must be a dict, a MoEConfig or None, got {type(override)}")
    merged = {**(size_moe or {}), **override}
    allowed = {f.name for f in dataclasses.fields(MoEConfig)}
    unknown = set(merged) - allowed
    if unknown:
        raise ValueError(f"unknown MoE field(s) {sorted(unknown)}; allowed: {sorted(allowed)}")
    return MoEConfig(**merged)


def build_model(config: ModelConfig) -> nn.Module:
    """Build and initialise the decoder (on the default device, FP32 parameters)."""
    if not isinstance(config, ModelConfig):
        raise ValueError(f"build_model needs a ModelConfig, got {type(config).__name__}; "
                         f"use model_config(name, vocab_size, max_seq_len) for a named size")
    return Transformer(config)
