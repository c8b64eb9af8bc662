"""A decode step captured once in a CUDA graph and replayed for every later token.

A decode step launches hundreds of small kernels; replaying them as one graph removes the host's
per-launch cost. The step must have static shapes and no host synchronisation: inputs (tokens,
slot, start) are copied into static buffers, the graph replays, and the logits come back in a
static buffer (valid until the next call).

Capture happens at the first call with that call's real inputs: the warm-up runs (which also
compile the Triton kernels) are ordinary executions of the same step, and every write a step does
is idempotent for given inputs (the same slot gets the same codes, a KIVI flush the same group), so
they leave the cache exactly as one execution would.
"""

from __future__ import annotations

from typing import Callable

import torch

StepFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class GraphedStep:
    def __init__(self, step: StepFn, warmup: int = 2):
        self.step, self.warmup = step, warmup
        self.graph: torch.cuda.CUDAGraph | None = None
        self.failure: str | None = None

    def _capture(self, tokens: torch.Tensor, slot: torch.Tensor, start: torch.Tensor) -> None:
        self.tokens, self.slot, self.start = tokens.clone(), slot.clone(), start.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self.step(self.tokens, self.slot, self.start)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.logits = self.step(self.tokens, self.slot, self.start)
        self.graph = graph

    def __call__(self, tokens: torch.Tensor, slot: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
        if self.failure is not None:
            return self.step(tokens, slot, start)
        if self.graph is None:
            try:
                self._capture(tokens, slot, start)
            except RuntimeError as error:  # e.g. a MoE layer's host-synchronising routing
                self.failure = f"CUDA graph capture failed, decoding eagerly: {error}".splitlines()[0]
                torch.cuda.synchronize()
                return self.step(tokens, slot, start)
        self.tokens.copy_(tokens)
        self.slot.copy_(slot)
        self.start.copy_(start)
        self.graph.replay()
        return self.logits
