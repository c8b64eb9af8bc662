"""GroupedLinear: one linear layer per expert, applied to tokens already sorted by expert.

After dispatch (see `dispatch.py`) the routed tokens form one tensor `input` [T, in] whose rows are
contiguous groups, one per expert in expert order; `group_sizes` [E] says how many rows each group
has (zero is allowed). The grouped GEMM computes, for every expert e and its row block X_e::

    output[rows of e] = X_e @ W_e^T          W = weight [E, out, in]

which is E independent `output` GEMMs (Y = X W^T) of different M and identical K, N. The backward
is again grouped: grad_input per group (dX_e = dY_e W_e) and one grad_weight per expert
(dW_e = dY_e^T X_e); autograd derives both from either implementation below.

Two high-precision implementations:
- `torch._grouped_mm` (one kernel launch for all experts) when it exists and applies: CUDA
  tensors, bf16 input and weight, in/out features multiples of 16 (16-byte aligned rows).
  It takes cumulative int32 group END offsets and the weight as [E, in, out] (a transpose view).
- otherwise a Python loop of per-expert `F.linear`, the exact reference (needs group sizes on the
  host, i.e. one device sync).
Under autocast both operands are first cast to the autocast dtype, as autocast does for F.linear,
so FP32 master weights under bf16 autocast still take the grouped_mm path.

The FP8 module swap replaces GroupedLinear with FP8GroupedLinear, so the module keeps the same
`weight` parameter and `forward(input, group_sizes)` signature that swap relies on.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

_GROUPED_MM_ALIGNMENT = 16


def grouped_mm_applicable(input: torch.Tensor, weight: torch.Tensor) -> tuple[bool, str]:
    """Whether torch._grouped_mm can run this GEMM, with the reason when it cannot."""
    if not hasattr(torch, "_grouped_mm"):
        return False, "torch._grouped_mm is not available in this torch build"
    if not (input.is_cuda and weight.is_cuda):
        return False, "grouped_mm path is used for CUDA tensors only"
    if input.dtype != torch.bfloat16 or weight.dtype != torch.bfloat16:
        return False, f"grouped_mm path needs bf16, got input {input.dtype}, weight {weight.dtype}"
    out_features, in_features = weight.shape[1], weight.shape[2]
    if in_features % _GROUPED_MM_ALIGNMENT or out_features % _GROUPED_MM_ALIGNMENT:
        return False, (f"grouped_mm needs in/out features multiples of {_GROUPED_MM_ALIGNMENT}, "
                       f"got in={in_features}, out={out_features}")
    return True, "torch._grouped_mm"


def grouped_linear_loop(input: torch.Tensor, weight: torch.Tensor,
                        group_sizes: torch.Tensor) -> torch.Tensor:
    """Reference grouped linear: one F.linear per expert over its contiguous row block."""
    sizes = group_sizes.tolist()  # host copy: split sizes must be Python ints
    blocks = torch.split(input, sizes, dim=0)
    outputs = [F.linear(block, weight[expert]) for expert, block in enumerate(blocks)]
    return torch.cat(outputs, dim=0)  # [T, out]


def grouped_linear_grouped_mm(input: torch.Tensor, weight: torch.Tensor,
                              group_sizes: torch.Tensor) -> torch.Tensor:
    """One torch._grouped_mm call; offsets are cumulative group ends as int32 on the device."""
    offsets = torch.cumsum(group_sizes, dim=0).to(torch.int32)  # [E]
    return torch._grouped_mm(input, weight.transpose(-2, -1), offs=offsets)  # [T, out]


def grouped_linear(input: torch.Tensor, weight: torch.Tensor, group_sizes: torch.Tensor,
                   use_grouped_mm: bool = True) -> torch.Tensor:
    """output[rows of e] = input[rows of e] @ weight[e]^T for contiguous expert groups."""
    _check_grouped_inputs(input, weight, group_sizes)
    input, weight = _autocast_operands(input, weight)
    if use_grouped_mm and grouped_mm_applicable(input, weight)[0]:
        try:
            return grouped_linear_grouped_mm(input, weight, group_sizes)
        except RuntimeError:
            pass  # unsupported GPU architecture or layout: the loop is always correct
    return grouped_linear_loop(input, weight, group_sizes)


def _autocast_operands(input: torch.Tensor,
                       weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Under autocast, cast both operands as autocast would for F.linear (FP32 master weights
    then still reach the one-kernel grouped_mm path instead of the per-expert loop)."""
    device_type = input.device.type
    if not torch.is_autocast_enabled(device_type):
        return input, weight
    dtype = torch.get_autocast_dtype(device_type)
    return input.to(dtype), weight.to(dtype)


def _check_grouped_inputs(input: torch.Tensor, weight: torch.Tensor,
                          group_sizes: torch.Tensor) -> None:
    if input.dim() != 2 or input.shape[1] != weight.shape[2]:
        raise ValueError(f"input must be [T, {weight.shape[2]}], got {tuple(input.shape)}")
    if group_sizes.shape != (weight.shape[0],):
        raise ValueError(f"group_sizes must have shape ({weight.shape[0]},), one count per expert, "
                         f"got {tuple(group_sizes.shape)}")
    if group_sizes.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"group_sizes must be int32 or int64, got {group_sizes.dtype}")


class GroupedLinear(nn.Module):
    """E bias-free linear layers stored as one parameter `weight` [E, out_features, in_features]."""

    def __init__(self, num_experts: int, in_features: int, out_features: int,
                 use_grouped_mm: bool = True, rows_per_token: int = 1):
        super().__init__()
        for name, value in (("num_experts", num_experts), ("in_features", in_features),
                            ("out_features", out_features), ("rows_per_token", rows_per_token)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"GroupedLinear {name} must be a positive int, got {value!r}")
        self.num_experts = num_experts
        self.in_features = in_features
        self.out_features = out_features
        self.use_grouped_mm = use_grouped_mm
        # rows the grouped GEMM gets per token entering the block (top_k for routed experts): the
        # precision policy sizes the GEMM as tokens x rows_per_token rows over all experts
        self.rows_per_token = rows_per_token
        self.weight = nn.Parameter(torch.empty(num_experts, out_features, in_features))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Same distribution as nn.Linear's default, independently per expert."""
        bound = 1.0 / math.sqrt(self.in_features)
        nn.init.uniform_(self.weight, -bound, bound)

    def forward(self, input: torch.Tensor, group_sizes: torch.Tensor) -> torch.Tensor:
        return grouped_linear(input, self.weight, group_sizes, self.use_grouped_mm)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, in_features={self.in_features}, "
                f"out_features={self.out_features}")
