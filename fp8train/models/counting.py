"""Closed-form parameter and FLOP counts of a `ModelConfig`, without building the model.

Parameters per decoder layer (no biases anywhere; head_dim = d_model / n_heads)::

    attention   q_proj d*H*hd + k_proj d*KV*hd + v_proj d*KV*hd + o_proj H*hd*d
    norms       2*d                               (attention norm, MLP norm)
    dense MLP   3*d*ffn_hidden                    (gate_proj, up_proj, down_proj)
    MoE         router d*E + routed 3*E*d*h + shared 3*d*(S*h)      h = expert_ffn_hidden

plus the embedding V*d, the final norm d and lm_head V*d (absent when tied to the embedding).

Training FLOPs per token follow the usual 6N + attention estimate (Kaplan et al., PaLM appendix):
every matmul weight costs 2 FLOPs per token forward and 4 backward, so 6 * N_matmul, where
N_matmul counts the weights a token actually multiplies with: attention projections, the dense MLP
or, for MoE layers, the router, the top_k ACTIVE routed experts and the shared experts, and the
lm_head (a real GEMM, tied or not). The embedding lookup and the norms are not matmuls. The
attention scores and the weighted sum add 12 * n_layers * d_model * seq_len (QK^T and AV, forward
and backward, without discounting the causal mask).
"""

from __future__ import annotations

from fp8train.models.model_config import ModelConfig


def attention_params(config: ModelConfig) -> int:
    q_and_o = 2 * config.d_model * config.n_heads * config.head_dim
    k_and_v = 2 * config.d_model * config.n_kv_heads * config.head_dim
    return q_and_o + k_and_v


def ffn_params(config: ModelConfig, layer_index: int, active_only: bool = False) -> int:
    """Parameters of one layer's feed-forward: dense MLP, or router + experts for MoE layers."""
    d = config.d_model
    moe = config.moe
    if not config.is_moe_layer(layer_index):
        return 3 * d * config.ffn_hidden
    routed_experts = moe.top_k if active_only else moe.n_routed_experts
    expert = 3 * d * moe.expert_ffn_hidden
    return d * moe.n_routed_experts + routed_experts * expert + moe.n_shared_experts * expert


def count_parameters(config: ModelConfig, exclude_embedding: bool = False,
                     active_only: bool = False) -> int:
    """Total (or per-token active) parameter count; equals sum(p.numel()) of the built model.

    exclude_embedding drops the embedding matrix (and with it a tied lm_head, which is the same
    tensor). active_only counts only top_k routed experts per MoE layer.
    """
    d, vocab = config.d_model, config.vocab_size
    per_layer = sum(attention_params(config) + 2 * d + ffn_params(config, i, active_only)
                    for i in range(config.n_layers))
    total = per_layer + d  # + final norm
    total += 0 if exclude_embedding else vocab * d
    total += 0 if config.tie_embeddings else vocab * d
    return total


def matmul_params_per_token(config: ModelConfig) -> int:
    """Weights each token multiplies with: projections, active FFN weights and lm_head."""
    layers = sum(attention_params(config) + ffn_params(config, i, active_only=True)
                 for i in range(config.n_layers))
    return layers + config.vocab_size * config.d_model


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Training (forward + backward) FLOPs per token at context length seq_len."""
    if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
    attention_scores = 12 * config.n_layers * config.d_model * seq_len
    return float(6 * matmul_params_per_token(config) + attention_scores)
