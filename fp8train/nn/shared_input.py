"""Several linear layers applied to ONE input, letting them share work on it.

    q, k, v = apply_to_same_input(x, self.q_proj, self.k_proj, self.v_proj)

is `tuple(layer(x) for layer in layers)`, except that when the first layer offers
`shared_input(x, layers)` and it returns something (an FP8 layer: x cast to FP8 once, for all of
them), each layer is called as `layer(x, shared_input=that)`. Every layer is still called through
its module `__call__`, so hooks (DeepSpeed ZeRO-3 gathering parameters) run as before. Plain
nn.Linear layers offer nothing: the models stay plain high-precision modules, and this file knows
nothing about FP8 (a bottom-layer protocol, no import of fp8train.numerics).
"""

from __future__ import annotations

import torch
from torch import nn


def apply_to_same_input(x: torch.Tensor, *layers: nn.Module) -> tuple[torch.Tensor, ...]:
    offer = getattr(layers[0], "shared_input", None)
    shared = offer(x, layers) if offer is not None else None
    if shared is None:
        return tuple(layer(x) for layer in layers)
    return tuple(layer(x, shared_input=shared) for layer in layers)
