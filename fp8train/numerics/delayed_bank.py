"""All delayed-scaling state of a model in a few flat tensors, updated in one launch per group.

A model with L delayed casters (3 per FP8 layer) would otherwise pay, every optimizer step, a
stack + update + 3 copies per caster: hundreds of tiny kernel launches and a Python loop. The bank
allocates, per (history length, algo, margin, device) group, one history [L, H], one scale [L],
one scale_inv [L] and one fp8_max [L], and re-points every caster's buffers at views of them:

    caster.amax_history  ->  bank.history[i]      caster.scale -> bank.scale[i:i+1]

The buffers stay the casters' own (state_dict, checkpoints and load_state_dict see them as
before; loading copies into the views in place), but the per-step work becomes one all-reduce of
history[:, 0] and one in-place update per group. If anything re-allocates the buffers
(`model.to(...)`, a buffer replaced by hand), `is_current()` notices and the bank is rebuilt.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.distributed as dist

from fp8train.numerics.role_caster import RoleCaster
from fp8train.quant.scaling import count_nonfinite_current_amax, delayed_scale_update


@dataclass
class _Group:
    casters: list[RoleCaster]
    algo: str
    margin: float
    history: torch.Tensor  # [L, H]
    scale: torch.Tensor  # [L]
    scale_inv: torch.Tensor  # [L]
    fp8_max: torch.Tensor  # [L]


def _make_group(members: list[RoleCaster], algo: str, margin: float) -> _Group:
    group = _Group(members, algo, margin,
                   torch.stack([c.amax_history for c in members]).float().contiguous(),
                   torch.cat([c.scale for c in members]).float().contiguous(),
                   torch.cat([c.scale_inv for c in members]).float().contiguous(),
                   torch.cat([c.fp8_max for c in members]).float().contiguous())
    for i, c in enumerate(members):  # the casters' buffers become views into the bank
        c._buffers["amax_history"] = group.history[i]
        c._buffers["scale"] = group.scale[i:i + 1]
        c._buffers["scale_inv"] = group.scale_inv[i:i + 1]
    return group


class DelayedScalingBank:
    """Flat, grouped delayed-scaling state for a fixed list of casters."""

    def __init__(self, casters: list[RoleCaster]):
        by_key: dict[tuple, list[RoleCaster]] = defaultdict(list)
        for c in casters:
            cfg = c.config
            by_key[(cfg.history_len, cfg.amax_compute_algo, float(cfg.margin), c.amax_history.device)].append(c)
        self.casters = list(casters)
        self.groups = [_make_group(members, algo, margin) for (_, algo, margin, _), members in by_key.items()]
        self.nonfinite_amaxes = 0  # non-finite slot-0 amaxes skipped by the updates (telemetry)
        self._addresses = [(c, g.history[i].data_ptr(), g.scale[i:i + 1].data_ptr(), g.scale_inv[i:i + 1].data_ptr())
                           for g in self.groups for i, c in enumerate(g.casters)]

    def is_current(self, casters: list[RoleCaster]) -> bool:
        """Do the casters still hold views into this bank (nothing re-allocated their buffers)?

        Runs every optimizer step, so it compares data pointers recorded once at construction
        instead of slicing the bank again (a view costs microseconds of host time per caster)."""
        if len(casters) != len(self.casters) or any(a is not b for a, b in zip(casters, self.casters)):
            return False
        return all(c._buffers["amax_history"].data_ptr() == h and c._buffers["scale"].data_ptr() == s
                   and c._buffers["scale_inv"].data_ptr() == si for c, h, s, si in self._addresses)

    @torch.no_grad()
    def all_reduce_current_amax(self, process_group=None) -> None:
        """One MAX all-reduce of every caster's history[0]; NaN travels as +inf (the update skips it)."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(process_group) == 1:
            return
        current = torch.cat([g.history[:, 0] for g in self.groups])
        current = torch.nan_to_num(current, nan=float("inf"), posinf=float("inf"))
        with torch.profiler.record_function("fp8_amax_all_reduce"):  # found by the scaling benchmark
            dist.all_reduce(current, op=dist.ReduceOp.MAX, group=process_group)
        for g, chunk in zip(self.groups, torch.split(current, [len(g.casters) for g in self.groups])):
            g.history[:, 0] = chunk

    @torch.no_grad()
    def update(self, kernel=None, count_nonfinite: bool = False) -> None:
        """The DelayedScaling update for every group: in place (one launch) with the Triton kernel.

        `count_nonfinite` adds this step's non-finite amaxes (skipped by the rule) to
        `nonfinite_amaxes`; it reads a device value, so it is asked for with the telemetry only."""
        for g in self.groups:
            if count_nonfinite:
                self.nonfinite_amaxes += int(count_nonfinite_current_amax(g.history))
            if kernel is not None and g.history.is_cuda:
                kernel(g.history, g.scale, g.scale_inv, g.fp8_max, g.margin, g.algo)
                continue
            history, scale, scale_inv = delayed_scale_update(g.history, g.scale, g.fp8_max, g.margin, g.algo)
            g.history.copy_(history)
            g.scale.copy_(scale)
            g.scale_inv.copy_(scale_inv)
