"""Calibration samples and evaluation windows, from any token stream.

A token stream is anything with `len()` and `read(start, length) -> int64 array`:
fp8train.data.TokenFile (a prepared dataset's split) is one, `ArrayTokens` wraps an in-memory array
(e.g. text tokenized with a pretrained model's own tokenizer).

    calibration_batches   `samples` random windows of `seq_len` tokens (distinct, non-overlapping
                          positions; fixed seed), in batches, as GPTQ's paper draws them
    eval_windows          the first `max_windows` NON-overlapping windows of seq_len + 1 tokens
                          (inputs + shifted labels), the standard perplexity protocol
    evaluate_perplexity   mean next-token cross-entropy over every window token -> loss, ppl
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm


class ArrayTokens:
    """A 1-D array of token ids as a token stream."""

    def __init__(self, ids, name: str = "tokens"):
        self.ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        self.path = name

    def __len__(self) -> int:
        return int(self.ids.size)

    def read(self, start: int, length: int) -> np.ndarray:
        return self.ids[start:start + length]


def _windows_available(tokens, seq_len: int) -> int:
    if not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive integer, got {seq_len!r}")
    return (len(tokens) - 1) // seq_len


def calibration_batches(tokens, samples: int, seq_len: int, batch_size: int = 8, seed: int = 0,
                        progress: bool = False) -> list[torch.Tensor]:
    """`samples` windows of `seq_len` ids as int64 batches [b, seq_len] (ValueError if too little data)."""
    if not isinstance(samples, int) or samples < 1:
        raise ValueError(f"calibration samples must be a positive integer, got {samples!r}")
    available = _windows_available(tokens, seq_len)
    if available < samples:
        raise ValueError(f"too little calibration data: {getattr(tokens, 'path', 'the stream')} has "
                         f"{len(tokens)} tokens = {available} windows of seq_len {seq_len}, but "
                         f"{samples} samples were asked for; lower calibration.samples or "
                         f"calibration.seq_len, or calibrate on a larger dataset")
    rng = np.random.default_rng(seed)
    starts = np.sort(rng.choice(available, size=samples, replace=False)) * seq_len
    rows = [torch.from_numpy(np.asarray(tokens.read(int(s), seq_len), dtype=np.int64))
            for s in tqdm(starts, desc="calibration samples", disable=not progress, leave=False)]
    stacked = torch.stack(rows)
    return list(stacked.split(batch_size))


def eval_windows(tokens, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """[W, seq_len + 1] non-overlapping windows from the start of the stream."""
    available = _windows_available(tokens, seq_len)
    if available < 1:
        raise ValueError(f"{getattr(tokens, 'path', 'the stream')} has {len(tokens)} tokens, fewer than "
                         f"one evaluation window of seq_len + 1 = {seq_len + 1}")
    count = available if max_windows is None else min(available, max_windows)
    return torch.stack([torch.from_numpy(np.asarray(tokens.read(i * seq_len, seq_len + 1), dtype=np.int64))
                        for i in range(count)])


@torch.no_grad()
def window_loss(model: nn.Module, windows: torch.Tensor) -> tuple[float, int]:
    """(sum of next-token losses, token count) of a batch of windows [b, T + 1]."""
    device = next(model.parameters()).device
    windows = windows.to(device)
    logits = model(windows[:, :-1])  # [b, T, V]
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1),
                           reduction="sum")
    return float(loss), windows[:, 1:].numel()


@torch.no_grad()
def evaluate_perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 4,
                        progress: bool = False, desc: str = "eval") -> dict[str, float]:
    """{'loss': mean cross-entropy (nats/token), 'ppl': exp(loss), 'tokens': count}."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in tqdm(windows.split(batch_size), desc=desc, disable=not progress, leave=False):
        loss_sum, tokens = window_loss(model, batch)
        total, count = total + loss_sum, count + tokens
    model.train(was_training)
    loss = total / count
    return {"loss": loss, "ppl": math.exp(min(loss, 700.0)), "tokens": count}
