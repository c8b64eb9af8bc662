"""AWQ (Lin et al. 2024): activation-aware per-channel scales, then a clipping search, then RTN.

Scale search, per scale group (decoder.py: a norm or linear feeding some linears):

    a_j = mean |x_j| over calibration tokens (the group's input)
    for r in {0, 1/grid, ..., (grid-1)/grid}:
        s = a^r, s /= sqrt(max(s) min(s))                     (clamped >= 1e-4 before normalizing)
        W' = Q(W * s) / s  for every linear of the group      (quantize with the preset's grid)
        loss(r) = mean (inspect(x) with W' - inspect(x) with W)^2   inspect = the module the
                                                                    group's output goes through
    keep the best s: prev.out /= s, W *= s  (fold_scale)

Clipping search, per linear except q/k (whose errors the softmax amplifies), per output row and
1xG group: max |w| shrunk by (1 - i/grid) for i < max_shrink * grid, clamp w to +-max, quantize,
keep the shrink with the least error of that group's partial output x_g . w_g over sampled tokens.
The final weights are then quantized with RTN (asymmetric g128 in AWQ's default preset).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fp8train.ptq.rtn import rtn_quantize
from fp8train.quant.granularity import GranularityKind
from fp8train.quant.spec import QuantSpec

CLIP_SKIPPED = ("q_proj", "k_proj")


@dataclass(frozen=True)
class AwqOptions:
    grid: int = 20
    clip: bool = True
    max_shrink: float = 0.5
    search_samples: int = 8  # calibration sequences used by both searches
    clip_tokens: int = 512
    rows_per_chunk: int = 256

    def __post_init__(self):
        if self.grid < 1 or self.search_samples < 1 or self.clip_tokens < 1 or self.rows_per_chunk < 1:
            raise ValueError(f"awq.grid, search_samples, clip_tokens, rows_per_chunk must be >= 1: {self}")
        if not 0 <= self.max_shrink < 1:
            raise ValueError(f"awq.max_shrink={self.max_shrink} must be in [0, 1)")


def fake_quantize_weight(weight: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    return rtn_quantize(weight, spec).dequantize().to(weight.dtype)


@torch.no_grad()
def search_group_scale(x: torch.Tensor, linears: list, specs: list[QuantSpec], inspect, grid: int) -> torch.Tensor:
    """The best s [K] for one group: x [.., K] the group's input, inspect(x) the output to match."""
    x_mean = x.reshape(-1, x.shape[-1]).abs().float().mean(dim=0)
    reference = inspect(x).float()
    originals = [linear.weight.data.clone() for linear in linears]
    best, best_loss = torch.ones_like(x_mean), float("inf")
    try:
        for step in range(grid):
            s = x_mean.pow(step / grid).clamp(min=1e-4)
            s = s / (s.max() * s.min()).sqrt()
            for linear, weight, spec in zip(linears, originals, specs):
                scaled = weight.float() * s[None, :]
                linear.weight.data = (fake_quantize_weight(scaled, spec).float() / s[None, :]).to(weight.dtype)
            loss = float((inspect(x).float() - reference).pow(2).mean())
            if loss < best_loss:
                best, best_loss = s.clone(), loss
    finally:
        for linear, weight in zip(linears, originals):
            linear.weight.data = weight
    return best


@torch.no_grad()
def search_clip(weight: torch.Tensor, x: torch.Tensor, spec: QuantSpec, options: AwqOptions) -> torch.Tensor:
    """W with each (row, group) clamped to the shrink of max|w| that best keeps x_g . w_g."""
    rows, cols = weight.shape
    g = spec.group_size if spec.grid.kind is GranularityKind.TILE else cols
    tokens = x.reshape(-1, cols).float()
    tokens = tokens[:: max(1, tokens.shape[0] // options.clip_tokens)][: options.clip_tokens]
    x_g = tokens.reshape(-1, cols // g, g).transpose(0, 1)  # [G, n, g]
    clipped = []
    for w in weight.float().split(options.rows_per_chunk):
        w_g = w.reshape(w.shape[0], cols // g, g).transpose(0, 1)  # [G, r, g]
        reference = torch.bmm(x_g, w_g.transpose(1, 2))  # [G, n, r]: each group's partial outputs
        max_orig = w_g.abs().amax(dim=-1, keepdim=True)  # [G, r, 1]
        best_max, best_err = max_orig.clone(), torch.full_like(max_orig, float("inf"))
        for i in range(int(options.max_shrink * options.grid)):
            max_val = max_orig * (1 - i / options.grid)
            trial = torch.clamp(w_g, -max_val, max_val).transpose(0, 1).reshape(w.shape)
            q = fake_quantize_weight(trial, spec).float().reshape(w.shape[0], cols // g, g).transpose(0, 1)
            err = (torch.bmm(x_g, q.transpose(1, 2)) - reference).pow(2).mean(dim=1).unsqueeze(-1)  # [G, r, 1]
            better = err < best_err
            best_err, best_max = torch.where(better, err, best_err), torch.where(better, max_val, best_max)
        clipped.append(torch.clamp(w_g, -best_max, best_max).transpose(0, 1).reshape(w.shape))
    return torch.cat(clipped).to(weight.dtype)
