"""The decoder protocol: what generation needs from a model, by duck typing (no model imports).

A model qualifies if it has (fp8train.models.Transformer does; so would any Llama-style decoder
that exposes the same names):

    model.embed(ids [B, T]) -> [B, T, d]                     token embedding (a module)
    model.rope.cos, model.rope.sin  [max_seq_len, hd / 2]    FP32 RoPE tables, rotate-half layout
    model.layers[i].attn_norm(x), .ffn_norm(x)                pre-norms (RMSNorm: .weight, .eps)
    model.layers[i].attn.{q,k,v,o}_proj(x)                    projections (nn.Linear or any module
                                                              mapping [..., in] -> [..., out])
    model.layers[i].attn.n_heads, .n_kv_heads, .head_dim      GQA: query head h uses KV head
                                                              h // (n_heads / n_kv_heads)
    model.layers[i].mlp(x)  or  model.layers[i].moe(x) -> (y, aux)   the FFN
    model.norm(x), model.lm_head(x) -> logits                final norm and head

Each block is pre-norm residual: x += o_proj(attn(attn_norm(x))); x += ffn(ffn_norm(x)).
`decoder_parts(model)` checks all of it once and names the first missing attribute.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

_LAYER_ATTRS = ("attn_norm", "attn", "ffn_norm")
_ATTN_ATTRS = ("q_proj", "k_proj", "v_proj", "o_proj", "n_heads", "n_kv_heads", "head_dim")


@dataclass
class LayerParts:
    attn_norm: Any
    q_proj: Any
    k_proj: Any
    v_proj: Any
    o_proj: Any
    ffn_norm: Any
    ffn: Callable[[torch.Tensor], torch.Tensor]
    mlp: Any = None  # the SwiGLU module when the FFN is one (gate_proj, up_proj, down_proj)


@dataclass
class DecoderParts:
    embed: Any
    cos: torch.Tensor
    sin: torch.Tensor
    layers: list[LayerParts]
    norm: Any
    lm_head: Any
    n_heads: int
    n_kv_heads: int
    head_dim: int

    @property
    def max_seq_len(self) -> int:
        return self.cos.shape[0]

    @property
    def n_layers(self) -> int:
        return len(self.layers)


def _require(obj: Any, names: tuple[str, ...], where: str) -> None:
    for name in names:
        if not hasattr(obj, name):
            raise ValueError(f"{where} has no attribute {name!r}; generation needs a decoder with "
                             f"{', '.join(names)} (see fp8train/inference/protocol.py)")


def _moe_ffn(moe: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    def ffn(x: torch.Tensor) -> torch.Tensor:
        return moe(x)[0]
    return ffn


def decoder_parts(model: Any) -> DecoderParts:
    """The pieces generation uses, checked once (ValueError naming what is missing)."""
    _require(model, ("embed", "rope", "layers", "norm", "lm_head"), type(model).__name__)
    _require(model.rope, ("cos", "sin"), "model.rope")
    layers = []
    for i, layer in enumerate(model.layers):
        _require(layer, _LAYER_ATTRS, f"model.layers[{i}]")
        _require(layer.attn, _ATTN_ATTRS, f"model.layers[{i}].attn")
        if hasattr(layer, "mlp"):
            ffn, mlp = layer.mlp, layer.mlp
        elif hasattr(layer, "moe"):
            ffn, mlp = _moe_ffn(layer.moe), None
        else:
            raise ValueError(f"model.layers[{i}] has neither 'mlp' nor 'moe'; see fp8train/inference/protocol.py")
        a = layer.attn
        layers.append(LayerParts(layer.attn_norm, a.q_proj, a.k_proj, a.v_proj, a.o_proj, layer.ffn_norm, ffn, mlp))
    if not layers:
        raise ValueError("model.layers is empty")
    attn = model.layers[0].attn
    heads, kv_heads, head_dim = int(attn.n_heads), int(attn.n_kv_heads), int(attn.head_dim)
    if heads % kv_heads:
        raise ValueError(f"n_heads={heads} is not a multiple of n_kv_heads={kv_heads}")
    return DecoderParts(model.embed, model.rope.cos, model.rope.sin, layers, model.norm, model.lm_head,
                        heads, kv_heads, head_dim)
