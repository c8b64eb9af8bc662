"""DeepSeek-style mixture-of-experts layer: FP32 router, routed SwiGLU experts, shared experts.

For every token x (a row of the flattened [N, D] activations)::

    logits = x @ W_router^T                     FP32, autocast off (router stays high precision)
    scores = softmax(logits) or sigmoid(logits) [N, E]
    topk_idx = topk(scores + expert_bias, k)    bias steers SELECTION only (aux-loss-free balancing)
    topk_weight = scores[topk_idx]              optionally renormalised to sum to 1 over the k
    y = sum_j topk_weight_j * Expert_{topk_idx_j}(x) + SharedExperts(x)

Experts are SwiGLU MLPs whose three projections are `GroupedLinear` modules (one weight per
expert); tokens reach them through `dispatch_plan` / `combine` (see dispatch.py). The experts get the
unsorted tokens and the dispatch order: gate and up read the same sorted tokens, which the first of
them prepares once (FP8 experts quantize the unsorted tokens and move FP8 rows; plain ones gather).

Load balancing, two ways (`MoEConfig.balancing`):
- "aux_loss": the Switch/DeepSeek balance loss  coef * E * sum_e f_e * P_e,  where f_e is the
  fraction of the k*T assignments routed to expert e and P_e the mean (normalised) score of e,
  per sequence or over the whole batch. It equals coef at a perfectly uniform router and is
  differentiable through P_e to the router weight.
- "bias" (DeepSeek-V3 auxiliary-loss-free): a per-expert FP32 buffer `expert_bias` is added to
  the scores for top-k selection only. After each optimizer step `update_bias()` nudges it:
  bias += speed * sign(mean_load - load), using the loads counted since the last update (summed
  over data-parallel ranks so every rank keeps the same bias). A small aux loss may still be
  added (DeepSeek-V3 keeps a sequence-wise one with coef 1e-4): set aux_loss_coef to 0 to disable.

The aux loss is returned only in training mode; evaluation losses stay pure cross-entropy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from fp8train.models.dispatch import assignment_weights, combine, dispatch_plan, expert_counts
from fp8train.nn.combine_rows import gather_rows_by_token, sum_rows
from fp8train.nn.grouped_linear import GroupedLinear
from fp8train.models.layers import FP32BufferModule, SwiGLU

SCORE_FUNCS = ("softmax", "sigmoid")
BALANCING_MODES = ("aux_loss", "bias")
AUX_LOSS_SCOPES = ("batch", "sequence")


@dataclass(frozen=True)
class MoEConfig:
    n_routed_experts: int
    n_shared_experts: int
    top_k: int
    expert_ffn_hidden: int
    score_func: str = "softmax"
    norm_topk_prob: bool = True
    aux_loss_coef: float = 0.01
    balancing: str = "aux_loss"
    bias_update_speed: float = 1e-3
    capacity_factor: float | None = None
    first_k_dense: int = 1
    aux_loss_scope: str = "batch"
    # multiply each expert row by its routing weight before down_proj (linear, so the result is the
    # same) and combine with a plain sum: the combine saves no expert output rows for backward
    route_weight_before_down: bool = False

    def __post_init__(self):
        _require_int(self, "n_routed_experts", minimum=1)
        _require_int(self, "n_shared_experts", minimum=0)
        _require_int(self, "expert_ffn_hidden", minimum=1)
        _require_int(self, "first_k_dense", minimum=0)
        _require_int(self, "top_k", minimum=1)
        if self.top_k > self.n_routed_experts:
            raise ValueError(f"MoEConfig.top_k={self.top_k} must be <= "
                             f"n_routed_experts={self.n_routed_experts}")
        _require_choice(self, "score_func", SCORE_FUNCS)
        _require_choice(self, "balancing", BALANCING_MODES)
        _require_choice(self, "aux_loss_scope", AUX_LOSS_SCOPES)
        for name in ("norm_topk_prob", "route_weight_before_down"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"MoEConfig.{name} must be a bool, got {getattr(self, name)!r}")
        for name in ("aux_loss_coef", "bias_update_speed"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise ValueError(f"MoEConfig.{name} must be a number >= 0, got {value!r}")
        cap = self.capacity_factor
        is_number = isinstance(cap, (int, float)) and not isinstance(cap, bool)
        if cap is not None and (not is_number or cap <= 0):
            raise ValueError(f"MoEConfig.capacity_factor must be None (drop-free) or > 0, "
                             f"got {cap!r}")


def _require_int(config, name: str, minimum: int) -> None:
    value = getattr(config, name)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{type(config).__name__}.{name} must be an int >= {minimum}, "
                         f"got {value!r}")


def _require_choice(config, name: str, allowed: tuple[str, ...]) -> None:
    value = getattr(config, name)
    if value not in allowed:
        raise ValueError(f"{type(config).__name__}.{name}={value!r} is not one of {list(allowed)}")


def route(logits: torch.Tensor, config: MoEConfig, expert_bias: torch.Tensor | None = None,
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FP32 routing. logits [N, E] -> (scores [N, E], topk_idx [N, k], topk_weight [N, k])."""
    logits = logits.float()
    scores = logits.softmax(dim=-1) if config.score_func == "softmax" else logits.sigmoid()
    selection = scores if expert_bias is None else scores + expert_bias.float()
    topk_idx = torch.topk(selection, config.top_k, dim=-1).indices  # [N, k]
    topk_weight = scores.gather(-1, topk_idx)  # gate weights come from the UNbiased scores
    if config.norm_topk_prob:
        topk_weight = topk_weight / (topk_weight.sum(dim=-1, keepdim=True) + 1e-20)
    return scores, topk_idx, topk_weight


def load_balance_loss(scores: torch.Tensor, topk_idx: torch.Tensor, num_experts: int,
                      score_func: str) -> torch.Tensor:
    """E * sum_e f_e * P_e, averaged over groups. scores [G, T, E], topk_idx [G, T, k].

    A group is a sequence (sequence-wise loss) or the whole batch (G = 1). Not yet scaled by coef.
    """
    groups, tokens, top_k = topk_idx.shape
    probs = scores if score_func == "softmax" else scores / scores.sum(dim=-1, keepdim=True)
    ones = torch.ones(groups, tokens * top_k, device=scores.device, dtype=torch.float32)
    counts = torch.zeros(groups, num_experts, device=scores.device, dtype=torch.float32)
    counts = counts.scatter_add(1, topk_idx.reshape(groups, tokens * top_k), ones)  # [G, E]
    routed_fraction = counts / (tokens * top_k)  # f_e, no gradient (a count)
    mean_prob = probs.mean(dim=1)  # P_e [G, E], differentiable w.r.t. the router
    return num_experts * (routed_fraction * mean_prob).sum(dim=-1).mean()


class RoutedExperts(nn.Module):
    """E SwiGLU experts as three GroupedLinear: down(silu(gate(x)) * up(x)) per expert group."""

    def __init__(self, num_experts: int, dim: int, hidden: int, top_k: int = 1):
        super().__init__()
        self.gate_proj = GroupedLinear(num_experts, dim, hidden, rows_per_token=top_k)
        self.up_proj = GroupedLinear(num_experts, dim, hidden, rows_per_token=top_k)
        self.down_proj = GroupedLinear(num_experts, hidden, dim, rows_per_token=top_k)

    def forward(self, x: torch.Tensor, group_sizes: torch.Tensor,
                token_index: torch.Tensor | None = None, row_weight: torch.Tensor | None = None) -> torch.Tensor:
        """x: the tokens sorted by expert [T, D]; or, with `token_index` [T], the unsorted tokens
        [N, D] and the sorted rows' source tokens (the sorted rows are x[token_index]). row_weight
        [T]: each row's routing weight, multiplied into down_proj's input (None: not applied here)."""
        tokens = x if token_index is None else self.sorted_tokens(x, token_index, group_sizes)
        hidden = F.silu(self.gate_proj(tokens, group_sizes)) * self.up_proj(tokens, group_sizes)
        if row_weight is not None:  # the product in FP32 (or wider), one rounding to the working dtype
            acc = torch.promote_types(hidden.dtype, torch.float32)
            hidden = (hidden.to(acc) * row_weight[:, None].to(acc)).to(hidden.dtype)
        return self.down_proj(hidden, group_sizes)

    def sorted_tokens(self, x: torch.Tensor, token_index: torch.Tensor, group_sizes: torch.Tensor):
        """x[token_index], prepared ONCE for gate and up: layers that can take it pre-quantized
        (`prepare_sorted_tokens`, the FP8 grouped layers) get it that way, others the gathered rows."""
        prepare = getattr(self.gate_proj, "prepare_sorted_tokens", None)
        if prepare is None or not hasattr(self.up_proj, "prepare_sorted_tokens"):
            return gather_rows_by_token(x, token_index)
        return prepare(x, token_index, group_sizes)


class MoE(FP32BufferModule):
    """Router + routed experts + optional shared experts. forward: [B, T, D] -> ([B, T, D], aux)."""

    def __init__(self, dim: int, config: MoEConfig):
        super().__init__()
        self.config = config
        num_experts = config.n_routed_experts
        self.router = nn.Linear(dim, num_experts, bias=False)
        self.experts = RoutedExperts(num_experts, dim, config.expert_ffn_hidden, config.top_k)
        self.shared_experts = (SwiGLU(dim, config.n_shared_experts * config.expert_ffn_hidden)
                               if config.n_shared_experts > 0 else None)
        self.register_buffer("expert_bias", torch.zeros(num_experts, dtype=torch.float32))
        self.register_buffer("expert_load", torch.zeros(num_experts, dtype=torch.int64))
        self.last_stats: dict[str, torch.Tensor] = {}

    def router_logits(self, x_flat: torch.Tensor) -> torch.Tensor:
        """[N, D] -> [N, E] in FP32 regardless of the input dtype or an active autocast."""
        with torch.autocast(device_type=x_flat.device.type, enabled=False):
            return F.linear(x_flat.float(), self.router.weight.float())

    def capacity(self, num_tokens: int) -> int | None:
        """Max assignments per expert: ceil(capacity_factor * N * k / E); None = drop-free."""
        factor = self.config.capacity_factor
        if factor is None:
            return None
        return math.ceil(factor * num_tokens * self.config.top_k / self.config.n_routed_experts)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch, seq_len, dim = x.shape
        x_flat = x.reshape(batch * seq_len, dim)  # [N, D]
        use_bias = self.config.balancing == "bias"
        scores, topk_idx, topk_weight = route(self.router_logits(x_flat), self.config,
                                              self.expert_bias if use_bias else None)
        group_sizes, plan = dispatch_plan(topk_idx, self.config.n_routed_experts, self.capacity(x_flat.shape[0]))
        if self.config.route_weight_before_down:
            y_sorted = self.experts(x_flat, group_sizes, plan.token_index, assignment_weights(plan, topk_weight))
            out = sum_rows(y_sorted, plan.token_index, x_flat.shape[0])
        else:
            y_sorted = self.experts(x_flat, group_sizes, plan.token_index)
            out = combine(y_sorted, topk_weight, plan, x_flat.shape[0])
        if self.shared_experts is not None:
            out = out + self.shared_experts(x_flat)
        aux_loss = self._aux_loss(scores, topk_idx, batch, seq_len)
        self._record(topk_idx, plan.num_dropped, plan.num_assignments, aux_loss)
        return out.reshape(batch, seq_len, dim), aux_loss

    def _aux_loss(self, scores: torch.Tensor, topk_idx: torch.Tensor, batch: int,
                  seq_len: int) -> torch.Tensor:
        coef = self.config.aux_loss_coef
        if coef == 0 or not self.training:
            return torch.zeros((), device=scores.device, dtype=torch.float32)
        groups = batch if self.config.aux_loss_scope == "sequence" else 1
        tokens = batch * seq_len // groups
        scores = scores.reshape(groups, tokens, -1)  # [G, T_group, E]
        topk_idx = topk_idx.reshape(groups, tokens, -1)  # [G, T_group, k]
        return coef * load_balance_loss(scores, topk_idx, self.config.n_routed_experts,
                                        self.config.score_func)

    @torch.no_grad()
    def _record(self, topk_idx: torch.Tensor, num_dropped: torch.Tensor, num_assignments: int,
                aux_loss: torch.Tensor) -> None:
        """Keep load statistics as device tensors (no host sync here) and count loads for bias."""
        load = expert_counts(topk_idx, self.config.n_routed_experts)
        if self.training and self.config.balancing == "bias":
            self.expert_load += load
        self.last_stats = expert_load_stats(load, num_dropped, num_assignments, aux_loss)

    @torch.no_grad()
    def update_bias(self, speed: float | None = None, process_group=None) -> None:
        """Aux-loss-free balancing step, once per optimizer step. No-op unless balancing='bias'.

        bias += speed * sign(mean_load - load); the load counters are then reset.
        """
        if self.config.balancing != "bias":
            return
        speed = self.config.bias_update_speed if speed is None else speed
        if not isinstance(speed, (int, float)) or speed < 0:
            raise ValueError(f"update_bias speed must be a number >= 0, got {speed!r}")
        load = self.expert_load.float()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(load, op=dist.ReduceOp.SUM, group=process_group)
        self.expert_bias += speed * torch.sign(load.mean() - load)  # all-zero load: no change
        self.expert_load.zero_()


def expert_load_stats(load: torch.Tensor, num_dropped: torch.Tensor, num_assignments: int,
                      aux_loss: torch.Tensor) -> dict[str, torch.Tensor]:
    """Balance statistics of one layer from its per-expert assignment counts load [E]."""
    load = load.float()
    mean = load.mean().clamp_min(1e-12)
    share = load / load.sum().clamp_min(1e-12)
    entropy = -(share * share.clamp_min(1e-30).log()).sum()
    max_entropy = math.log(load.numel()) if load.numel() > 1 else 1.0
    return {
        "load_max_over_mean": load.max() / mean,
        "load_entropy": entropy / max_entropy,  # 1 = perfectly uniform
        "load_cv": load.std(unbiased=False) / mean,
        "dropped_frac": num_dropped.float() / max(num_assignments, 1),
        "dropped": num_dropped.float(),
        "assignments": torch.full((), float(num_assignments), device=load.device),
        "aux_loss": aux_loss.detach().float(),
    }


def collect_moe_metrics(moe_layers: list[tuple[int, MoE]]) -> dict[str, float]:
    """Flatten the layers' last_stats into `moe/...` floats with a single device-to-host copy."""
    stats = [(index, layer.last_stats) for index, layer in moe_layers if layer.last_stats]
    if not stats:
        return {}
    keys = list(stats[0][1])
    values = torch.stack([torch.stack([s[k] for k in keys]) for _, s in stats]).tolist()
    per_layer = [dict(zip(keys, row)) for row in values]
    metrics = {
        "moe/load_max_over_mean": max(row["load_max_over_mean"] for row in per_layer),
        "moe/dropped_frac": (sum(row["dropped"] for row in per_layer)
                             / max(sum(row["assignments"] for row in per_layer), 1.0)),
        "moe/aux_loss": sum(row["aux_loss"] for row in per_layer),
    }
    for (index, _), row in zip(stats, per_layer):
        for key in ("load_max_over_mean", "load_entropy", "load_cv", "dropped_frac"):
            metrics[f"moe/layer{index}/{key}"] = row[key]
    return metrics
