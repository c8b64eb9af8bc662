"""SmoothQuant (Xiao et al. 2023): move activation outliers into the weights before W8A8.

Per input channel j of the linears fed by one norm (q/k/v after attn_norm, gate/up after ffn_norm):

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)      W max over all linears sharing the norm,
                                                     clamped >= 1e-5; s clamped >= 1e-5
    norm.weight /= s,   linear.weight[:, j] *= s_j   -> the same function in float

then W8 per output channel (absmax / 127) and A8 per token (dynamic) or per tensor (static).
alpha ~ 0.5 (OPT) to 0.8-0.85 (Llama); larger alpha moves more of the range into the weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SmoothQuantOptions:
    alpha: float = 0.5

    def __post_init__(self):
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"smoothquant.alpha={self.alpha} must be in [0, 1]")


def smoothing_scales(input_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """s [K] from the calibrated max|X_j| [K] and the weights [N_i, K] that read X."""
    weight_absmax = torch.cat([w.detach().float().abs() for w in weights], dim=0).amax(dim=0).clamp(min=1e-5)
    return (input_absmax.float().pow(alpha) / weight_absmax.pow(1 - alpha)).clamp(min=1e-5)
