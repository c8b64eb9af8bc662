"""Warm start for delayed scaling: the first step's scales come from a measured pass, not from 1.

Delayed scaling encodes step t with scales computed from the amaxes of steps < t. A fresh run
has no history, so Transformer Engine's convention (which we share) starts every scale at 1.

Scale 1 is harmless for activations and weights of order 1, but not for gradients.
- A gradient element of 1e-6 is below E5M2's smallest subnormal (2^-16 ~ 1.5e-5) and far below
  E4M3's (2^-9 ~ 2e-3). The first backward flushes most of the gradient to zero.
- Each layer's grad_input is computed from that flushed grad_output, so the damage compounds
  toward the input.
- Measured on moe_2b_wide (H200, session 11): the first step's gradient norm was 14.2 with
  `hybrid` against 93.8 in BF16, and 37 against 141 on the second step. The FP8 loss curve then
  ran about one step behind BF16's.

The warm start runs one forward and backward pass before the first step, with every delayed
caster encoding as current scaling does (`RoleCaster.warm_start`: scale = fmax / amax of the
tensor being cast). Its GEMMs, and the gradients they pass down, are therefore well scaled. The
casts record their amaxes as usual. `after_optimizer_step` then agrees on them across ranks and
turns them into the first step's scales, with the recipe's own update rule.

The pass changes no weight and no buffer besides the delayed-scaling state (the others, such as
MoE load counters, are restored after it). Its gradients are taken with `torch.autograd.grad`
with respect to the input of `first_block`, made a leaf: nothing is accumulated into `.grad`, no
optimizer or DeepSpeed gradient hook runs, and no backward reaches the embedding. It runs eagerly
(`set_stance("force_eager")`), so no graph is compiled for it.

    warm_start_delayed_scales(model, lambda: model(ids, labels), model.layers[0])
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from fp8train.numerics.step_update import after_optimizer_step, delayed_casters


def warm_start_delayed_scales(model: nn.Module, loss_fn: Callable[[], torch.Tensor], first_block: nn.Module,
                              process_group=None) -> int:
    """One forward (`loss_fn()`, which must run `first_block`) and backward to `first_block`'s input
    with every delayed caster of `model` in warm-start mode, then the delayed scales from what the
    pass recorded. Returns the number of delayed casters warmed (0: nothing to do, no pass run)."""
    casters = delayed_casters(model)
    if not casters:
        return 0
    fp8_state = {id(buf) for caster in casters for buf in caster.buffers()}
    others = [(buf, buf.clone()) for buf in model.buffers() if id(buf) not in fp8_state]
    for caster in casters:
        caster.warm_start = True
    try:
        with torch.compiler.set_stance("force_eager"):
            _forward_backward(loss_fn, first_block)
    finally:
        for caster in casters:
            caster.warm_start = False
        with torch.no_grad():
            for buf, saved in others:  # e.g. MoE load counters: the pass is not a training step
                buf.copy_(saved)
    after_optimizer_step(model, process_group)
    return len(casters)


def _forward_backward(loss_fn: Callable[[], torch.Tensor], first_block: nn.Module) -> None:
    captured = []

    def leaf_input(_module, args):
        captured.append(args[0].detach().requires_grad_())
        return (captured[0], *args[1:])

    handle = first_block.register_forward_pre_hook(leaf_input)
    try:
        loss = loss_fn()
    finally:
        handle.remove()
    if not captured:
        raise ValueError("warm_start_delayed_scales: loss_fn() never ran first_block; pass the model's "
                         "first decoder block")
    torch.autograd.grad(loss, captured[0])
