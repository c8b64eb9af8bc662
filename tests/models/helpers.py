"""Small configs for model tests: they build and run in milliseconds on CPU."""

from fp8train.models import ModelConfig, MoEConfig

VOCAB = 256


def dense_config(**overrides) -> ModelConfig:
    fields = dict(vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                  ffn_hidden=128, max_seq_len=64)
    fields.update(overrides)
    return ModelConfig(**fields)


def moe_config(moe_overrides=None, **overrides) -> ModelConfig:
    moe_fields = dict(n_routed_experts=8, n_shared_experts=1, top_k=2, expert_ffn_hidden=32)
    moe_fields.update(moe_overrides or {})
    return dense_config(moe=MoEConfig(**moe_fields), **overrides)
