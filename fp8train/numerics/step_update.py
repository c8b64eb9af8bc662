"""Per-step FP8 state management: delayed-scaling updates, distributed amax agreement, caches.

Call `after_optimizer_step(model, process_group)` once per optimizer step (at the gradient
accumulation boundary). It

1. gathers slot 0 of every delayed-scaling amax history in the model into ONE flat tensor and
   all-reduces it with MAX over the data-parallel group, so every rank computes identical scales
   (one collective for the whole model: no hang when some layer did not run on some rank);
2. updates every history and scale with the DelayedScaling rule of the core
   (fp8train.quant.scaling; batched: one update per (history length, algo, margin) group; a
   Triton kernel on CUDA);
3. invalidates every FP8 weight cache, so the next forward re-casts the updated master weights.

`attach_optimizer(model, optimizer)` additionally invalidates the weight caches from a step
post-hook of a torch optimizer, for training loops that do not call after_optimizer_step.
"""

from __future__ import annotations

import torch
from torch import nn

from fp8train.numerics.delayed_bank import DelayedScalingBank
from fp8train.numerics.role_caster import RoleCaster
from fp8train.quant.casts import delayed_update_kernel


def delayed_casters(model: nn.Module) -> list[RoleCaster]:
    return fp8_members(model)[0]


def weight_cached_layers(model: nn.Module) -> list[nn.Module]:
    return fp8_members(model)[1]


def fp8_members(model: nn.Module) -> tuple[list[RoleCaster], list[nn.Module]]:
    """(delayed-scaling casters, layers with an FP8 weight cache), in ONE walk of the model: the
    per-step update needs both, and walking a large model costs host time every step."""
    casters, cached = [], []
    for m in model.modules():
        if isinstance(m, RoleCaster):
            if m.delayed:
                casters.append(m)
        elif hasattr(m, "invalidate_weight_cache"):
            cached.append(m)
    return casters, cached


def has_fp8_state(model: nn.Module) -> bool:
    """Does anything in the model hold per-step FP8 state (a role caster, an FP8 weight cache)?

    False (every layer BF16, e.g. the precision policy kept them all, or recipe bf16): the
    per-step hooks here and the telemetry have nothing to do, and a training loop may skip them."""
    return any(isinstance(m, RoleCaster) or hasattr(m, "invalidate_weight_cache") for m in model.modules())


def invalidate_weight_caches(model: nn.Module) -> None:
    for layer in weight_cached_layers(model):
        layer.invalidate_weight_cache()


def after_optimizer_step(model: nn.Module, process_group=None, count_nonfinite: bool = False) -> None:
    """Once per optimizer step: agree on amaxes across ranks, update delayed scales, drop caches.

    The delayed state is banked (delayed_bank.py): one all-reduce and one update launch per group
    instead of a few launches per caster. `count_nonfinite` (with the telemetry) counts the
    non-finite amaxes the update skipped, see `fp8_telemetry`.
    """
    casters, cached = fp8_members(model)
    bank = _bank_for(model, casters)
    if bank is not None:
        bank.all_reduce_current_amax(process_group)
        bank.update(delayed_update_kernel(bank.casters[0].amax_history.device), count_nonfinite)
    for layer in cached:
        layer.invalidate_weight_cache()


def delayed_bank(model: nn.Module) -> DelayedScalingBank | None:
    """The model's delayed-scaling bank, built (or rebuilt) if needed; None without delayed casters.

    Building it re-points the casters' buffers into flat tensors, so code that records buffer
    addresses (CUDA graph capture) must call this first."""
    return _bank_for(model, delayed_casters(model))


def _bank_for(model: nn.Module, casters: list[RoleCaster]) -> DelayedScalingBank | None:
    if not casters:
        return None
    bank = getattr(model, "_fp8_delayed_bank", None)
    if bank is None or not bank.is_current(casters):
        bank = DelayedScalingBank(casters)
        object.__setattr__(model, "_fp8_delayed_bank", bank)  # a cache, not module state
    return bank


def attach_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer):
    """Invalidate the model's FP8 weight caches after every `optimizer.step()`; returns the hook handle."""
    return optimizer.register_step_post_hook(lambda *_: invalidate_weight_caches(model))
