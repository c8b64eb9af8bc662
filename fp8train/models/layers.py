"""Building blocks of the decoder: RMSNorm, rotary position embedding (RoPE), SwiGLU MLP.

These are the pieces DeepSeek-V3 (and every FP8 recipe we know of) keeps OUT of FP8: the
normalisation and the position rotation run in FP32 whatever the activation dtype, because
both are cheap elementwise ops whose error would be amplified by everything downstream.

RMSNorm::

    y = x / sqrt(mean(x^2) + eps) * weight          computed on x.float(), cast back to x.dtype

RoPE rotates each (x_i, x_{i + d/2}) pair of a head by the angle pos * theta^(-2i/d)
("rotate-half" layout, as in the Llama reference code)::

    out_lo = x_lo * cos - x_hi * sin
    out_hi = x_hi * cos + x_lo * sin

The cos/sin tables are non-persistent FP32 buffers (recomputable from the config, so they do not
belong in checkpoints). `model.to(torch.bfloat16)` would normally cast them too; the modules here
re-upcast their own floating buffers after every `_apply` (see `FP32BufferModule`).

SwiGLU MLP: down_proj(silu(gate_proj(x)) * up_proj(x)). All three are plain nn.Linear so the FP8
module swap converts them (their names do not end in a skipped component such as `gate`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fp8train.nn import apply_to_same_input


class FP32BufferModule(nn.Module):
    """A module whose own floating-point buffers stay FP32 across `.to(dtype)` / `.bfloat16()`.

    Used for state whose precision matters more than its size: RoPE tables, MoE balancing bias.
    Only this module's direct buffers are touched; children follow their own rules.
    """

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        for name, buffer in self._buffers.items():
            if buffer is not None and buffer.is_floating_point() and buffer.dtype != torch.float32:
                self._buffers[name] = buffer.float()
        return self


class RMSNorm(nn.Module):
    """Root-mean-square layer norm computed in FP32; output has the input's dtype."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_fp32 = x.float()
        normed = x_fp32 * torch.rsqrt(x_fp32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return (normed * self.weight.float()).to(x.dtype)


class RotaryEmbedding(FP32BufferModule):
    """Precomputed RoPE tables `cos`, `sin` of shape [max_seq_len, head_dim // 2], FP32."""

    def __init__(self, head_dim: int, max_seq_len: int, theta: float = 10000.0):
        super().__init__()
        if head_dim % 2 != 0:
            raise ValueError(f"RoPE needs an even head_dim, got head_dim={head_dim}")
        inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        positions = torch.arange(max_seq_len, dtype=torch.float64)
        angles = torch.outer(positions, inv_freq)  # [max_seq_len, head_dim // 2]
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def forward(self, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (cos, sin) for positions 0..seq_len-1, each [seq_len, head_dim // 2]."""
        return self.cos[:seq_len], self.sin[:seq_len]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, T, H, head_dim] by the per-position angles; math in FP32, result in x.dtype."""
    x_fp32 = x.float()
    half = x.shape[-1] // 2
    x_lo, x_hi = x_fp32[..., :half], x_fp32[..., half:]
    cos = cos[None, :, None, :]  # [1, T, 1, head_dim // 2], broadcast over batch and heads
    sin = sin[None, :, None, :]
    rotated = torch.cat((x_lo * cos - x_hi * sin, x_hi * cos + x_lo * sin), dim=-1)
    return rotated.to(x.dtype)


class SwiGLU(nn.Module):
    """Gated MLP: down_proj(silu(gate_proj(x)) * up_proj(x)), no biases."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = apply_to_same_input(x, self.gate_proj, self.up_proj)  # FP8: x cast once for both
        return self.down_proj(F.silu(gate) * up)
