"""Token dispatch and combine for mixture-of-experts, as two pure functions.

Routing gives every token n a list of k experts `topk_idx` [N, k] and weights `topk_weight` [N, k].
That is N*k ASSIGNMENTS; assignment a = n * k + j sends token n to expert topk_idx[n, j].

dispatch: sort the assignments by expert (stable, so within an expert tokens keep their order),
gather the token rows in that order -> `x_sorted` [M, D] made of contiguous per-expert groups of
sizes `group_sizes` [E]. This is exactly the layout GroupedLinear consumes. Drop-free by default
(M = N*k). With a `capacity` (max rows per expert), the assignments past an expert's capacity, in
token order, are dropped: they never reach an expert and their share of the output is zero (the
residual stream still carries the token). The plan counts them; nothing is dropped silently.

combine: the inverse, summed in FP32 (up to k rows land on one token, and the sum of bf16
partials would round k times)::

    out[n] = sum_j topk_weight[n, j] * y[expert topk_idx[n, j] applied to x[n]]

On CUDA (fp8train's kernels loaded) it is a gather: each token reads its k rows through
`assignment_rows` (kernels/moe_combine.py: one launch forward, one backward, no atomics, no FP32
copy of the rows). Elsewhere every row is scaled by its gate weight and
added into its token's row with `index_add_`.

Gradients flow to `y_sorted` (hence the experts) and to `topk_weight` (hence the router).

`dispatch_plan` is dispatch without the gather: the MoE block hands the unsorted tokens and the
plan's `token_index` to its experts, so FP8 experts can quantize the N tokens once and move FP8 rows
(the cast-once path). Drop-free routing has static shapes and no host sync: expert counts come from
a scatter-add of fixed length E (never a bincount, whose length depends on the largest id), so the
MoE block compiles without graph breaks and captures in a CUDA graph. A capacity limit drops a
data-dependent number of rows: that path has dynamic shapes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fp8train.nn.combine_rows import combine_rows, kernels_on


@dataclass(frozen=True)
class DispatchPlan:
    """Bookkeeping that lets `combine` undo `dispatch`.

    token_index: [M] int64, the token each sorted row came from.
    slot_index:  [M] int64, which of the token's k choices it is (column of topk_weight).
    num_assignments: N * k, the routed assignments before any drop.
    num_dropped: 0-dim int64 tensor, assignments dropped by the capacity limit.
    """

    token_index: torch.Tensor
    slot_index: torch.Tensor
    num_assignments: int
    num_dropped: torch.Tensor


def dispatch(x: torch.Tensor, topk_idx: torch.Tensor, num_experts: int,
             capacity: int | None = None) -> tuple[torch.Tensor, torch.Tensor, DispatchPlan]:
    """Group the token rows of x [N, D] by expert.

    Returns (x_sorted [M, D], group_sizes [E] int64, plan); M = N*k minus dropped assignments.
    Checks that every expert id is in [0, num_experts) (one host read on a GPU).
    """
    _check_dispatch_args(x, topk_idx, num_experts, capacity)
    low, high = (int(topk_idx.min()), int(topk_idx.max())) if topk_idx.numel() else (0, 0)
    if low < 0 or high >= num_experts:
        raise ValueError(f"topk_idx holds expert ids outside [0, num_experts={num_experts}) "
                         f"(smallest {low}, largest {high})")
    group_sizes, plan = dispatch_plan(topk_idx, num_experts, capacity)
    return x[plan.token_index], group_sizes, plan


def expert_counts(topk_idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Assignments per expert, int64 [E]: a fixed-length scatter-add (no data-dependent shape)."""
    flat = topk_idx.reshape(-1)
    return torch.zeros(num_experts, dtype=torch.int64, device=flat.device).scatter_add_(
        0, flat.long(), torch.ones_like(flat, dtype=torch.int64))


def dispatch_plan(topk_idx: torch.Tensor, num_experts: int,
                  capacity: int | None = None) -> tuple[torch.Tensor, DispatchPlan]:
    """(group_sizes [E] int64, plan): the sorted order of the assignments, without moving any row.
    Expert ids must be in [0, num_experts) (topk over E scores gives that; `dispatch` checks it)."""
    num_tokens, top_k = topk_idx.shape
    expert_of_assignment = topk_idx.reshape(-1)  # [N*k], assignment a = n * k + j
    group_sizes = expert_counts(expert_of_assignment, num_experts)
    order = torch.argsort(expert_of_assignment, stable=True)  # [N*k] assignments by expert
    num_dropped = torch.zeros((), dtype=torch.int64, device=topk_idx.device)
    if capacity is not None:
        order, group_sizes, num_dropped = _apply_capacity(order, group_sizes, capacity)
    token_index = torch.div(order, top_k, rounding_mode="floor")
    slot_index = order - token_index * top_k
    return group_sizes, DispatchPlan(token_index, slot_index, num_tokens * top_k, num_dropped)


def _apply_capacity(order: torch.Tensor, group_sizes: torch.Tensor,
                    capacity: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep the first `capacity` assignments of each expert group (in token order)."""
    group_starts = torch.cumsum(group_sizes, dim=0) - group_sizes  # [E]
    expert_sorted = torch.repeat_interleave(torch.arange(group_sizes.numel(),
                                                         device=group_sizes.device), group_sizes)
    sorted_positions = torch.arange(order.numel(), device=order.device)
    position_in_group = sorted_positions - group_starts[expert_sorted]
    keep = position_in_group < capacity  # [N*k] over sorted assignments
    kept_sizes = group_sizes.clamp(max=capacity)
    num_dropped = (group_sizes - kept_sizes).sum()
    return order[keep], kept_sizes, num_dropped


def combine(y_sorted: torch.Tensor, topk_weight: torch.Tensor, plan: DispatchPlan,
            num_tokens: int) -> torch.Tensor:
    """Weighted sum of expert outputs y_sorted [M, D] back to tokens -> [num_tokens, D].

    Accumulates in FP32, returns y_sorted.dtype.
    """
    if topk_weight.shape[0] != num_tokens or topk_weight.numel() != plan.num_assignments:
        raise ValueError(f"topk_weight must be [{num_tokens}, k] with N*k={plan.num_assignments}, "
                         f"got {tuple(topk_weight.shape)}")
    if y_sorted.shape[0] != plan.token_index.shape[0]:
        raise ValueError(f"y_sorted must have {plan.token_index.shape[0]} rows (one per dispatched "
                         f"assignment), got {y_sorted.shape[0]}")
    if kernels_on(y_sorted):
        return combine_rows(y_sorted.contiguous(), topk_weight, assignment_rows(plan, topk_weight.shape[1]))
    gate = assignment_weights(plan, topk_weight).float()  # [M]
    weighted = y_sorted.float() * gate[:, None]  # [M, D]
    out = torch.zeros(num_tokens, y_sorted.shape[1], dtype=torch.float32, device=y_sorted.device)
    out = out.index_add(0, plan.token_index, weighted)  # [N, D]
    return out.to(y_sorted.dtype)


def assignment_weights(plan: DispatchPlan, topk_weight: torch.Tensor) -> torch.Tensor:
    """[M]: the routing weight of every dispatched row, in y_sorted's (expert-sorted) order."""
    return topk_weight[plan.token_index, plan.slot_index]


def assignment_rows(plan: DispatchPlan, top_k: int) -> torch.Tensor:
    """[N * k] int64: the row of y_sorted holding assignment n * k + j, -1 where it was dropped."""
    rows = torch.full((plan.num_assignments,), -1, dtype=torch.int64, device=plan.token_index.device)
    rows[plan.token_index * top_k + plan.slot_index] = torch.arange(plan.token_index.shape[0], device=rows.device)
    return rows


def _check_dispatch_args(x: torch.Tensor, topk_idx: torch.Tensor, num_experts: int,
                         capacity: int | None) -> None:
    if x.dim() != 2:
        raise ValueError(f"x must be [N, D], got shape {tuple(x.shape)}")
    if topk_idx.dim() != 2 or topk_idx.shape[0] != x.shape[0]:
        raise ValueError(f"topk_idx must be [N={x.shape[0]}, k], got shape {tuple(topk_idx.shape)}")
    if topk_idx.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"topk_idx must be int32 or int64, got {topk_idx.dtype}")
    if not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
    if capacity is not None and (not isinstance(capacity, int) or capacity < 0):
        raise ValueError(f"capacity must be None (drop-free) or an int >= 0, got {capacity!r}")
