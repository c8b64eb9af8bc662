"""The MoE expert GEMMs of two benchmark layers, with operands for every grouped-GEMM variant.

A layer (fp8train/models/moe.py) has three GroupedLinear projections: gate and up [E, hidden, dim]
and down [E, dim, hidden]. Over the routed rows (tokens x top_k, sorted by expert) they give six
grouped GEMMs per step, in the NT form of kernels/grouped_gemm_ops.py:

    role         proj     form     A                B (per expert)        out
    output       gate|up  experts  X   [T, dim]     W_gu  [hidden, dim]   [T, hidden]      (x2: gate, up)
    output       down     experts  H   [T, hidden]  W_d   [dim, hidden]   [T, dim]
    grad_input   gate|up  experts  dH  [T, hidden]  W_gu^T [dim, hidden]  [T, dim]         (x2)
    grad_input   down     experts  dY  [T, dim]     W_d^T [hidden, dim]   [T, hidden]
    grad_weight  gate|up  tokens   dH^T [hidden, T] X^T [dim, T]          [E, hidden, dim] (x2)
    grad_weight  down     tokens   dY^T [dim, T]    H^T [hidden, T]       [E, dim, hidden]

Operand shapes repeat (output gate|up and grad_input down are both [T, dim] x [E, hidden, dim]), so
the data is built once per shape; the roles differ in the A operand's FP8 format (E4M3 forward, E5M2
gradients in the hybrid recipe) and in the accumulation (fast forward, promoted backward).
Group sizes come from a random top-k router. Layouts per variant: BF16 and our tensorwise and
blockwise-experts kernels use the ragged groups as dispatched; torch._scaled_grouped_mm gets groups
padded to 16 rows (what fp8train's layer gives it today); blockwise grad_weight gets groups padded to
128 (its token tiles must not straddle experts). TFLOP/s always counts the useful 2*T*N*K.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


@dataclass(frozen=True)
class Layer:
    name: str
    tokens: int
    top_k: int
    experts: int
    dim: int
    hidden: int

    @property
    def rows(self) -> int:
        return self.tokens * self.top_k


LAYERS = {"large": Layer("large", 16384, 8, 32, 7168, 2048), "small": Layer("small", 8192, 2, 16, 2048, 1408),
          "tiny": Layer("tiny", 48, 2, 4, 256, 128)}  # tiny: --dry-run on CPU (TRITON_INTERPRET=1)
ROLES = [("output", "gate|up"), ("output", "down"), ("grad_input", "gate|up"), ("grad_input", "down"),
         ("grad_weight", "gate|up"), ("grad_weight", "down")]


def route_sizes(layer: Layer, device: str, seed: int = 0) -> list[int]:
    """Rows per expert from a random top-k router (near-uniform, like a balanced MoE)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    logits = torch.randn(layer.tokens, layer.experts, device=device, generator=gen)
    chosen = logits.topk(layer.top_k, dim=-1).indices.reshape(-1)
    return torch.bincount(chosen, minlength=layer.experts).tolist()


@dataclass
class Groups:
    """A layout of the routed rows: padded sizes, device END offsets and the real-row index."""

    sizes: list[int]
    padded: list[int]
    offs: torch.Tensor
    total: int
    dest: torch.Tensor  # [T_real] row of every real row in this layout


def layout(sizes: list[int], align: int, device: str) -> Groups:
    padded = [-(-s // align) * align for s in sizes]
    starts, acc = [], 0
    for p in padded:
        starts.append(acc)
        acc += p
    dest = torch.cat([torch.arange(st, st + s) for st, s in zip(starts, sizes)]).to(device)
    offs = torch.tensor(padded, dtype=torch.int64).cumsum(0).to(torch.int32).to(device)
    return Groups(sizes, padded, offs, acc, dest)


def scatter_rows(x: torch.Tensor, groups: Groups) -> torch.Tensor:
    """x [T_real, C] -> [T_layout, C], zeros in the padding."""
    if groups.total == x.shape[0]:
        return x
    return x.new_zeros(groups.total, x.shape[1]).index_copy_(0, groups.dest, x)


def tensorwise(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Saturating current-scaled cast: (fp8, scale_inv [1])."""
    fmax = torch.finfo(dtype).max
    amax = x.abs().amax().float().clamp_min(1e-12)
    scale = fmax / amax
    return (x.float() * scale).clamp(-fmax, fmax).to(dtype), (1.0 / scale).reshape(1)


def flop_waste(sizes: list[int], bm: int, bk: int, tail: int, pad: int = 128) -> dict[str, float]:
    """Percent of extra FLOPs over the useful ones: the experts form computes whole BM-row tiles
    (ragged groups), the tokens form whole BK chunks plus tail chunks of `tail` tokens, blockwise
    grad_weight whole 128-token tiles, torch._scaled_grouped_mm the 16-padded groups."""
    real = sum(sizes)

    def tokens_cost(s):
        full = s // bk * bk
        return full + -(-(s - full) // tail) * tail

    return {"experts": 100 * (sum(-(-s // bm) * bm for s in sizes) / real - 1),
            "tokens": 100 * (sum(tokens_cost(s) for s in sizes) / real - 1),
            "tokens_blockwise": 100 * (sum(-(-s // pad) * pad for s in sizes) / real - 1),
            "torch_pad16": 100 * (sum(-(-s // 16) * 16 for s in sizes) / real - 1)}
