"""Rotary position embedding at arbitrary per-row positions (incremental decoding, left padding).

The decoder protocol's convention (fp8train/models/layers.py): rotate-half pairs (x_i, x_{i+D/2})
by the angle pos * theta^(-2i/D), tables cos/sin [max_seq_len, D/2] in FP32, math in FP32:

    out_lo = x_lo * cos - x_hi * sin
    out_hi = x_hi * cos + x_lo * sin

The model's own `apply_rotary` takes one position range shared by the batch; a left-padded batch
needs a position per row and token, hence this variant (tests check it against the model).
"""

from __future__ import annotations

import torch


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """x [B, T, heads, D] rotated by positions [B, T] (int64); result in x.dtype."""
    x32 = x.float()
    half = x.shape[-1] // 2
    lo, hi = x32[..., :half], x32[..., half:]
    c = cos[positions][:, :, None, :]  # [B, T, 1, D/2]
    s = sin[positions][:, :, None, :]
    return torch.cat((lo * c - hi * s, hi * c + lo * s), dim=-1).to(x.dtype)
