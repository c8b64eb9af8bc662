"""The step guard: a non-finite optimizer step is never applied, and the report says where it began.

A step is *bad* when the loss of a micro-batch on any rank, or a gradient, is not finite. A bad
step must leave no trace in the model: no parameter update, no optimizer-moment update, and no
FP8 scale advanced on a garbage amax. Per optimizer step the trainer calls

    begin_step()             snapshot the model's persistent buffers: FP8 amax histories and
                             scales, MoE load counters (one multi-tensor copy); forget last
                             step's gradients
    ... micro-batches ...    a hook per parameter records max |grad| of each micro-batch
    before_boundary(losses)  before the boundary engine.step(): all ranks agree (MAX
                             all-reduce) whether any loss or FP8 amax/scale is non-finite (an
                             overflowing activation saturates in the FP8 cast, so the loss can
                             stay finite while the amax is inf); if so the step is vetoed
    engine.step()            DeepSpeed's BF16/ZeRO optimizers skip a step whose gradient norm is
                             non-finite on their own. Below them, `optimizer_pre_hook` (on the
                             client AdamW) drops every gradient when the step is vetoed or a
                             gradient it is about to apply is non-finite (configurations where
                             DeepSpeed does not check, e.g. fp32): torch's AdamW leaves a
                             parameter without a gradient untouched (no moments, no decay)
    after_step(...)          all ranks agree whether the step was bad; a bad one gets the buffer
                             snapshot back and a StepReport; the trainer then skips the FP8
                             update and MoE bias balancing and moves the LR schedule on
                             (`sync_lr_schedule`), as for any step

The report names the modules whose buffers went non-finite (for FP8, a layer's caster for one
operand role: an input amax points at the forward, a grad_output amax at the backward), the
parameters whose gradients did, and any weights that are already non-finite, gathered over all
ranks. The guard only reads module buffers by name, never the numerics internals.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from fp8train.train import distributed

SHOWN_NAMES = 4  # names listed per kind in a report; the rest are counted


def _finite_flags(tensors: list[torch.Tensor]) -> list[bool]:
    """One host sync for the lot."""
    if not tensors:
        return []
    return torch.stack([torch.isfinite(t).all() for t in tensors]).tolist()


def _gathered(names: list[str]) -> list[str]:
    """Collective: the union of every rank's names, in first-seen order."""
    return list(dict.fromkeys(n for part in distributed.gather_objects(names) for n in part))


class BufferSnapshot:
    """A copy of the model's persistent buffers (FP8 amax histories and scales, MoE load counters),
    restored after a bad step: what a forward/backward records there must not outlive the step.

    Buffers are looked up by name on each use: the FP8 core may re-point them (its delayed-scaling
    bank makes them views of flat tensors on the first update); restoring copies in place."""

    def __init__(self, model: nn.Module):
        # every name of a parameter: a tied one (lm_head.weight = embed.weight) is in the state dict twice
        parameters = {name for name, _ in model.named_parameters(remove_duplicate=False)}
        names = [name for name in model.state_dict(keep_vars=True) if name not in parameters]
        self.entries = [(name, model.get_submodule(name.rpartition(".")[0]), name.rpartition(".")[2])
                        for name in names]
        self.saved: list[torch.Tensor] | None = None

    def buffers(self) -> list[torch.Tensor]:
        return [module._buffers[name] for _, module, name in self.entries]

    def floating(self) -> list[torch.Tensor]:
        return [b for b in self.buffers() if b.is_floating_point()]

    @torch.no_grad()
    def take(self) -> None:
        current = self.buffers()
        if self.saved is None or any(s.shape != c.shape or s.device != c.device or s.dtype != c.dtype
                                     for s, c in zip(self.saved, current)):
            self.saved = [c.detach().clone() for c in current]
        elif current:
            torch._foreach_copy_(self.saved, current)

    @torch.no_grad()
    def restore(self) -> None:
        if self.saved:
            torch._foreach_copy_(self.buffers(), self.saved)

    def nonfinite(self) -> list[str]:
        """The modules (FP8 casters: a layer and an operand role) holding a non-finite buffer."""
        flags = _finite_flags(self.buffers())
        owners = (full.rsplit(".", 1)[0] for (full, _, _), ok in zip(self.entries, flags) if not ok)
        return list(dict.fromkeys(owners))


class GradientWatch:
    """A hook per trainable parameter records max |grad| of every micro-batch (before DeepSpeed
    reduces or moves it), so a bad step can name the parameters whose gradients went non-finite."""

    def __init__(self, model: nn.Module):
        trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        self.names = [name for name, _ in trainable]
        self.amax: list[list[torch.Tensor]] = [[] for _ in trainable]
        for index, (_, param) in enumerate(trainable):
            param.register_hook(self._recorder(index))

    def _recorder(self, index: int):
        def record(grad: torch.Tensor) -> None:
            self.amax[index].append(torch.linalg.vector_norm(grad.detach(), float("inf")))
        return record

    def reset(self) -> None:
        for values in self.amax:
            values.clear()

    def nonfinite(self) -> list[str]:
        recorded = [(name, torch.stack(values)) for name, values in zip(self.names, self.amax) if values]
        flags = _finite_flags([values for _, values in recorded])
        return [name for (name, _), ok in zip(recorded, flags) if not ok]


def nonfinite_weights(model: nn.Module) -> list[str]:
    """Parameters holding a non-finite value (this rank's partition under ZeRO-3)."""
    named = list(model.named_parameters())
    flags = _finite_flags([getattr(p, "ds_tensor", p) for _, p in named])
    return [name for (name, _), ok in zip(named, flags) if not ok]


def nonfinite_state(model: nn.Module, device: torch.device) -> list[str]:
    """Collective: non-finite weights or buffers (FP8 amax/scale) on any rank; checked before
    every save, so no checkpoint ever holds them."""
    local = nonfinite_weights(model) + BufferSnapshot(model).nonfinite()
    return _gathered(local) if distributed.any_rank(bool(local), device) else []


def _names(kind: str, names: list[str]) -> str:
    more = f" (+{len(names) - SHOWN_NAMES} more)" if len(names) > SHOWN_NAMES else ""
    return f"{kind} in {', '.join(names[:SHOWN_NAMES])}{more}"


@dataclass
class StepReport:
    """What went wrong in one bad step (all ranks' view)."""

    step: int
    loss: float  # this rank's mean micro-batch loss
    grad_norm: float | None
    loss_nonfinite: bool
    buffers: list[str] = field(default_factory=list)  # modules with a non-finite buffer (FP8 amax/scale)
    grads: list[str] = field(default_factory=list)
    weights: list[str] = field(default_factory=list)
    loss_scale_overflow: bool = False  # fp16: DeepSpeed's loss scaler skipped it (not divergence)

    def describe(self) -> str:
        parts = [f"loss {'non-finite on some rank' if self.loss_nonfinite else f'{self.loss:.4g}'}",
                 f"gradient norm {self.grad_norm if self.grad_norm is not None else 'n/a'}"]
        if self.buffers:
            parts.append(_names("non-finite buffers (FP8 amax/scale)", self.buffers))
        if self.grads:
            parts.append(_names("non-finite gradients", self.grads))
        if self.weights:
            parts.append(_names("non-finite weights", self.weights))
        return f"step {self.step} was not applied: " + "; ".join(parts)


class StepGuard:
    """See the module docstring. `fp16`: DeepSpeed's dynamic loss scaling is on, so a gradient
    overflow with a finite loss is the loss scaler at work, reported but not divergence."""

    def __init__(self, model: nn.Module, device: torch.device, fp16: bool = False):
        self.model, self.device, self.fp16 = model, device, fp16
        self.snapshot = BufferSnapshot(model)
        self.gradients = GradientWatch(model)
        self.loss_bad = self.veto = self.dropped = False

    def begin_step(self) -> None:
        self.loss_bad = self.veto = self.dropped = False
        self.snapshot.take()
        self.gradients.reset()

    def before_boundary(self, losses: list[torch.Tensor]) -> None:
        """Collective, one host sync: veto the step if a loss or an FP8 amax/scale (a saturated
        overflow leaves the loss finite) is non-finite on any rank."""
        flags = [~torch.isfinite(torch.stack(losses)).all()]
        buffers = self.snapshot.floating()
        if buffers:
            flags.append(~torch.isfinite(torch.nn.utils.get_total_norm(buffers, norm_type=math.inf)))
        local = [float(flag) for flag in torch.stack(flags).tolist()]
        agreed = distributed.all_reduce(local + [0.0] * (2 - len(local)), "max", self.device)
        self.loss_bad = agreed[0] > 0
        self.veto = self.loss_bad or agreed[1] > 0

    @torch.no_grad()
    def optimizer_pre_hook(self, optimizer: torch.optim.Optimizer, args, kwargs) -> None:
        """Registered with `register_step_pre_hook` on the client optimizer."""
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not self.veto and params:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params], norm_type=math.inf)
            self.veto = not bool(torch.isfinite(norm))
        if self.veto:
            for param in params:
                param.grad = None
            self.dropped = True

    def after_step(self, step: int, losses: list[torch.Tensor], grad_norm) -> StepReport | None:
        """Collective. None for a good step; for a bad one, restore the buffers and report."""
        norm = None if grad_norm is None else float(grad_norm)
        local = self.veto or self.dropped or (norm is not None and not math.isfinite(norm))
        if not distributed.any_rank(local, self.device):
            return None
        report = StepReport(step, float(torch.stack(losses).mean()), norm, self.loss_bad,
                            buffers=_gathered(self.snapshot.nonfinite()),
                            grads=_gathered(self.gradients.nonfinite()),
                            weights=_gathered(nonfinite_weights(self.model)))
        report.loss_scale_overflow = self.fp16 and not self.loss_bad and not report.weights
        self.snapshot.restore()
        return report


def sync_lr_schedule(scheduler, step: int) -> None:
    """Advance the LR schedule to `step`: a skipped or rolled-back-over step still moves it on
    (DeepSpeed does not step the schedule on a step it skipped itself)."""
    with warnings.catch_warnings():  # "lr_scheduler.step() before optimizer.step()": intended here
        warnings.simplefilter("ignore", UserWarning)
        while scheduler.last_epoch < step:
            scheduler.step()
