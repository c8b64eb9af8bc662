"""CUDA graphs for FP8 layers: one replay instead of dozens of kernel launches per layer.

An FP8 linear launches about ten kernels per forward+backward (casts, GEMMs, the bias) and runs
Python around each; below ~4096 features the GPU finishes them faster than the host issues them,
so small FP8 layers are host-bound and lose to BF16. A CUDA graph records the kernels of one
forward and one backward once (`torch.cuda.make_graphed_callables`) and replays each with a
single launch. A replay re-runs no Python, which sets the rules a graphed FP8 module must keep:

* Every device buffer a kernel touches keeps its address. The delayed-scaling bank re-points the
  casters' buffers into flat tensors when it is first built, so it is built before capture; the
  per-step update (`after_optimizer_step`) then writes scales in place, outside the graph, and the
  replays read them. The cast kernels max-accumulate amaxes into history slot 0 in place.
* No Python-side cache: a cached FP8 weight would be baked into the graph and go stale after the
  optimizer step. Graphed layers cast their weight inside the graph on every call (one weight cast
  per micro-batch instead of one per step: cheap for small layers, which is where graphs pay).
* No host synchronisation: the dense FP8 path has none. MoE expert layers need the group sizes on
  the host, so they cannot be graphed and are refused with a reason.
* Static shapes: replays take inputs shaped like the sample arguments.

The warm-up iterations of the capture run real forwards and backwards: their amaxes are recorded
in history slot 0 like any micro-batch's.
"""

from __future__ import annotations

import torch
from torch import nn

from fp8train.numerics.grouped_linear import FP8GroupedLinear
from fp8train.numerics.step_update import delayed_bank, weight_cached_layers


def make_graphed_fp8(module: nn.Module, sample_args: tuple, num_warmup_iters: int = 3) -> nn.Module:
    """`torch.cuda.make_graphed_callables(module, sample_args)` made safe for FP8 layers (see above)."""
    if not torch.cuda.is_available():
        raise RuntimeError("make_graphed_fp8 needs a CUDA device (CUDA graphs); run the module eagerly on CPU")
    grouped = [name for name, m in module.named_modules() if isinstance(m, FP8GroupedLinear)]
    if grouped:
        raise ValueError(f"cannot CUDA-graph MoE expert layers {grouped[:3]}: their group sizes are read on "
                         f"the host every call; graph the dense parts separately")
    delayed_bank(module)
    for layer in weight_cached_layers(module):
        layer.cache_weight = False
        layer.invalidate_weight_cache()
    return torch.cuda.make_graphed_callables(module, sample_args, num_warmup_iters=num_warmup_iters)
