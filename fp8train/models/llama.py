"""Llama-style decoder-only transformer (optionally with DeepSeek-style MoE layers).

    tokens [B, T] -> embed -> n_layers x DecoderBlock -> norm -> lm_head -> logits [B, T, V]

    DecoderBlock (pre-norm residual):
        x = x + attn(attn_norm(x))            causal GQA self-attention with RoPE
        x = x + ffn(ffn_norm(x))              SwiGLU MLP, or MoE for layers >= moe.first_k_dense

Every GEMM is a plain bias-free nn.Linear (GroupedLinear for routed experts) so the FP8 module swap
can convert them afterwards. Module names are chosen for that swap: `embed`, `lm_head` and the MoE
`router` are skipped (kept high precision, as in DeepSeek-V3); `q_proj`, `k_proj`, `v_proj`,
`o_proj`, `gate_proj`, `up_proj`, `down_proj` are converted. Norms, RoPE, softmax attention
(F.scaled_dot_product_attention) and the loss (cross-entropy on logits.float()) stay out of FP8.

`forward(input_ids, labels)` expects labels ALREADY aligned with the positions: labels[b, t] is
the token to predict after input_ids[b, :t+1] (the data pipeline shifts); -100 is ignored.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fp8train.models import counting
from fp8train.nn.grouped_linear import GroupedLinear
from fp8train.models.layers import RMSNorm, RotaryEmbedding, SwiGLU, apply_rotary
from fp8train.models.model_config import ModelConfig
from fp8train.models.moe import MoE, collect_moe_metrics

IGNORE_INDEX = -100


class Attention(nn.Module):
    """Causal multi-head attention with grouped-query KV heads and RoPE on q and k."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = (config.n_heads, config.n_kv_heads,
                                                        config.head_dim)
        d = config.d_model
        self.q_proj = nn.Linear(d, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, d, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, seq_len, _ = x.shape
        q = self.q_proj(x).view(batch, seq_len, self.n_heads, self.head_dim)  # [B, T, H, hd]
        k = self.k_proj(x).view(batch, seq_len, self.n_kv_heads, self.head_dim)  # [B, T, KV, hd]
        v = self.v_proj(x).view(batch, seq_len, self.n_kv_heads, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, heads, T, hd]
        repeats = self.n_heads // self.n_kv_heads
        if repeats > 1:  # GQA: each KV head serves `repeats` consecutive query heads
            k = k.repeat_interleave(repeats, dim=1)  # [B, H, T, hd]
            v = v.repeat_interleave(repeats, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, H, T, hd]
        out = out.transpose(1, 2).reshape(batch, seq_len, self.n_heads * self.head_dim)
        return self.o_proj(out)


class DecoderBlock(nn.Module):
    """Pre-norm residual block; the FFN is `mlp` (SwiGLU) or `moe`. Returns (x, aux_loss)."""

    def __init__(self, config: ModelConfig, layer_index: int):
        super().__init__()
        self.attn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.attn = Attention(config)
        self.ffn_norm = RMSNorm(config.d_model, config.norm_eps)
        if config.is_moe_layer(layer_index):
            self.moe = MoE(config.d_model, config.moe)
        else:
            self.mlp = SwiGLU(config.d_model, config.ffn_hidden)

    def forward(self, x: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        if hasattr(self, "moe"):
            ffn_out, aux_loss = self.moe(self.ffn_norm(x))
            return x + ffn_out, aux_loss
        return x + self.mlp(self.ffn_norm(x)), None


class Transformer(nn.Module):
    """Decoder-only LM: forward(input_ids [B, T], labels=None) -> scalar loss or logits."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.rope = RotaryEmbedding(config.head_dim, config.max_seq_len, config.rope_theta)
        self.layers = nn.ModuleList(DecoderBlock(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.last_metrics: dict[str, float] = {}
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """N(0, init_std) for every matrix; residual-output projections (o_proj, down_proj) are
        scaled by 1/sqrt(2 * n_layers) so the residual stream's variance does not grow with
        depth."""
        std = self.config.init_std
        residual_std = std / math.sqrt(2 * self.config.n_layers)
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding, GroupedLinear)):
                is_residual_out = name.endswith(("o_proj", "down_proj"))
                module_std = residual_std if is_residual_out else std
                nn.init.normal_(module.weight, mean=0.0, std=module_std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        self._check_inputs(input_ids, labels)
        cos, sin = self.rope(input_ids.shape[1])
        x = self.embed(input_ids)  # [B, T, D]
        aux_losses = []
        for layer in self.layers:
            x, aux_loss = layer(x, cos, sin)
            if aux_loss is not None:
                aux_losses.append(aux_loss)
        logits = self.lm_head(self.norm(x))  # [B, T, V]
        self.last_metrics = collect_moe_metrics(self.moe_layers())
        if labels is None:
            return logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                               ignore_index=IGNORE_INDEX)  # logits [B*T, V], labels [B*T]
        return loss + sum(aux_losses) if aux_losses else loss

    def _check_inputs(self, input_ids: torch.Tensor, labels: torch.Tensor | None) -> None:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
        if input_ids.shape[1] > self.config.max_seq_len:
            raise ValueError(f"sequence length {input_ids.shape[1]} exceeds "
                             f"max_seq_len={self.config.max_seq_len}")
        if labels is not None and labels.shape != input_ids.shape:
            raise ValueError(f"labels shape {tuple(labels.shape)} must equal input_ids shape "
                             f"{tuple(input_ids.shape)}")

    def moe_layers(self) -> list[tuple[int, MoE]]:
        return [(i, layer.moe) for i, layer in enumerate(self.layers) if hasattr(layer, "moe")]

    @torch.no_grad()
    def update_moe_bias(self, speed: float | None = None, process_group=None) -> None:
        """Aux-loss-free balancing: call once per optimizer step (no-op for dense / aux_loss)."""
        for _, moe in self.moe_layers():
            moe.update_bias(speed, process_group)

    def num_parameters(self, exclude_embedding: bool = False) -> int:
        """Unique parameters (a tied lm_head counts once); optionally without the embedding."""
        embedding = self.embed.weight
        return sum(p.numel() for p in self.parameters()
                   if not (exclude_embedding and p is embedding))

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (6 * active matmul params + attention), see counting.py."""
        return counting.flops_per_token(self.config, seq_len)
