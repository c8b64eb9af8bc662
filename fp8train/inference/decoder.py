"""IncrementalDecoder: prefill a prompt into the static KV cache, then decode one token per step.

The model's own submodules and weights do the work (protocol.py); only the attention is replaced,
by the cache's: prefill attends over the prompt in full precision (F.scaled_dot_product_attention,
like the model) and writes the prompt's keys and values into the cache; every decode step rotates
q and k, writes the new k and v into the cache (quantized per the cache mode) and attends over the
cache. The caller owns slots: a batch shares slot numbers, row b's prompt is LEFT-padded and starts
at slot start[b]; its RoPE position is slot - start[b]. Padding tokens' keys and values are zeroed
before the write (so they never widen a KIVI group's range) and masked in every attention.

`step` has static shapes and takes the slot as a 0-d device tensor: on CUDA with the cache kernels
it can be captured in a CUDA graph (cuda_graph.py). A `DecodePlan` (plan.py) may replace the
per-layer module calls with fused ones (QKV in one GEMM, add + RMSNorm in one kernel).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fp8train.inference.kv_cache import StaticKVCache
from fp8train.inference.protocol import DecoderParts, decoder_parts
from fp8train.inference.rope import rotate


def prefill_mask(start: torch.Tensor, tokens: int) -> torch.Tensor:
    """Boolean [B, 1, T, T]: causal, keys at slots >= start[b]; a padded query sees itself only
    (its output is never used, but must not be NaN)."""
    idx = torch.arange(tokens, device=start.device)
    causal = idx[None, :] <= idx[:, None]  # [T(query), T(key)]
    valid_key = idx[None, None, :] >= start[:, None, None]  # [B, 1, T]
    return ((causal[None] & valid_key) | torch.eye(tokens, dtype=torch.bool, device=start.device))[:, None]


def prompt_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Full-precision attention over the prompt, q [B, Hq, T, hd], k, v [B, H, T, hd] (GQA repeat)."""
    repeats = q.shape[1] // k.shape[1]
    if repeats > 1:
        k, v = k.repeat_interleave(repeats, dim=1), v.repeat_interleave(repeats, dim=1)
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class IncrementalDecoder:
    def __init__(self, model, cache: StaticKVCache, plan=None):
        self.parts: DecoderParts = decoder_parts(model)
        p = self.parts
        if (cache.n_layers, cache.n_kv_heads, cache.head_dim) != (p.n_layers, p.n_kv_heads, p.head_dim):
            shape = (cache.n_layers, cache.n_kv_heads, cache.head_dim)
            raise ValueError(f"cache shape (layers, kv_heads, head_dim) = {shape}"
                             f" does not fit the model's {(p.n_layers, p.n_kv_heads, p.head_dim)}")
        if cache.max_len > p.max_seq_len and not cache.quant.key_per_channel:
            raise ValueError(f"cache of {cache.max_len} slots exceeds the model's max_seq_len={p.max_seq_len}")
        self.cache = cache
        self.plan = plan

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
        """input_ids [B, T] (left-padded; row b valid from start[b]) -> logits [B, T, V]."""
        p, cache = self.parts, self.cache
        batch, tokens = input_ids.shape
        if tokens > cache.max_len:
            raise ValueError(f"prompt of {tokens} tokens does not fit the cache's {cache.max_len} slots")
        if self.plan is not None:
            return self.plan.prefill(self, input_ids, start)
        idx = torch.arange(tokens, device=input_ids.device)
        positions = (idx[None, :] - start[:, None]).clamp(min=0)  # [B, T]
        valid = (idx[None, :] >= start[:, None])[:, :, None, None]  # [B, T, 1, 1]
        padded = bool((start > 0).any())
        mask = prefill_mask(start, tokens) if padded else None
        x = p.embed(input_ids)
        for i, layer in enumerate(p.layers):
            h = layer.attn_norm(x)
            q = layer.q_proj(h).view(batch, tokens, p.n_heads, p.head_dim)
            k = layer.k_proj(h).view(batch, tokens, p.n_kv_heads, p.head_dim)
            v = layer.v_proj(h).view(batch, tokens, p.n_kv_heads, p.head_dim)
            q, k = rotate(q, p.cos, p.sin, positions), rotate(k, p.cos, p.sin, positions)
            k, v = k * valid, v * valid
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, heads, T, hd]
            cache.write(i, k, v, 0, start)
            out = prompt_attention(q, k, v, mask)
            x = x + layer.o_proj(out.transpose(1, 2).reshape(batch, tokens, -1))
            x = x + layer.ffn(layer.ffn_norm(x))
        return p.lm_head(p.norm(x))

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, slot: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
        """tokens [B] at `slot` (0-d int64 tensor, same device) -> next-token logits [B, V]."""
        if self.plan is not None:
            return self.plan.step(self, tokens, slot, start)
        p, cache = self.parts, self.cache
        batch = tokens.shape[0]
        x = p.embed(tokens[:, None])  # [B, 1, d]
        for i, layer in enumerate(p.layers):
            h = layer.attn_norm(x)
            q = layer.q_proj(h).view(batch, p.n_heads, p.head_dim)
            k = layer.k_proj(h).view(batch, p.n_kv_heads, p.head_dim)
            v = layer.v_proj(h).view(batch, p.n_kv_heads, p.head_dim)
            q = cache.write_rotary(i, q, k, v, slot, p.cos, p.sin, start)
            out = cache.attend(i, q, slot, start)  # [B, Hq, hd]
            x = x + layer.o_proj(out.reshape(batch, 1, -1))
            x = x + layer.ffn(layer.ffn_norm(x))
        return p.lm_head(p.norm(x))[:, 0]
