"""Validation loss and perplexity on the held-out split.

Every rank walks its shard of the same val batches (fp8train.data.ValBatches gives all ranks
the same number of batches, so the collectives inside the engine's forward stay matched); the
token-weighted loss sums are all-reduced, so every rank returns the same numbers. The forward
goes through the DeepSpeed engine (ZeRO-3 gathers parameters there) under no_grad in eval mode.
"""

from __future__ import annotations

import math

import torch

from fp8train.train import distributed

IGNORE_INDEX = -100


@torch.no_grad()
def evaluate(engine, val_batches, device: torch.device, before_batch=lambda: None) -> dict[str, float]:
    """{'val/loss': mean cross-entropy per token (nats), 'val/ppl': exp(loss)}.

    `before_batch` runs before each forward (the trainer passes compiling.mark_graph_step when the
    compiled graphs replay as CUDA graphs)."""
    engine.eval()
    loss_sum, token_count = 0.0, 0.0
    for input_ids, labels in val_batches:
        before_batch()
        loss = engine(input_ids.to(device), labels.to(device))
        tokens = float((labels != IGNORE_INDEX).sum())
        loss_sum += float(loss) * tokens
        token_count += tokens
    engine.train()
    loss_sum, token_count = distributed.all_reduce([loss_sum, token_count], "sum", device)
    loss = loss_sum / token_count
    return {"val/loss": loss, "val/ppl": math.exp(min(loss, 700.0))}
