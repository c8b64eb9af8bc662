"""KV-cache quality, measured two-pass: prefill, then teacher-forced decode reading the cache.

For each window of W + 1 tokens: prefill the first P tokens (full-precision attention over the
prompt, whose keys and values go into the cache, quantized per the mode), then feed tokens
P .. W-1 one decode step at a time, each step attending over the (quantized) cache, and score the
next token. Perplexity = exp(mean NLL) over the W - P scored tokens per window. Every mode sees the
same windows, so the change vs the BF16 cache is the cost of the cache's quantization alone (KIVI:
tokens older than the newest R are quantized, so P + (W - P) must exceed R + G for KIVI to
quantize anything).

    rows = kv_cache_quality(model, val_tokens, ["bf16", "int8", "int4", "kivi"], window=512,
                            prefill=256, n_windows=8)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fp8train.inference.decoder import IncrementalDecoder
from fp8train.inference.generation import make_cache
from fp8train.inference.kv_modes import KVQuantization, kv_quantization


@dataclass
class KVQuality:
    mode: str
    nll: float  # mean over scored tokens, nats
    tokens: int
    bytes_per_token_per_layer: float
    detail: str = ""

    @property
    def ppl(self) -> float:
        return math.exp(self.nll)


def windows_of(tokens: torch.Tensor, window: int, n_windows: int) -> torch.Tensor:
    """[n, window + 1] consecutive non-overlapping windows from the start of a 1-D token stream."""
    count = min(n_windows, (tokens.numel() - 1) // window)
    if count < 1:
        raise ValueError(f"{tokens.numel()} tokens cannot fill one window of {window} + 1")
    return torch.stack([tokens[i * window: i * window + window + 1] for i in range(count)]).long()


@torch.no_grad()
def teacher_forced_nll(model, windows: torch.Tensor, prefill: int, quant: KVQuantization,
                       batch_size: int = 8, use_kernels: bool | None = None) -> tuple[float, int]:
    """(sum of NLL, count) over positions prefill..W-1 of every window, decoding step by step."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    width = windows.shape[1] - 1
    if not 1 <= prefill < width:
        raise ValueError(f"prefill={prefill} must be in [1, window={width})")
    for first in range(0, windows.shape[0], batch_size):
        chunk = windows[first:first + batch_size].to(device)
        batch = chunk.shape[0]
        cache = make_cache(model, quant, batch, width, use_kernels=use_kernels)
        decoder = IncrementalDecoder(model, cache)
        start = torch.zeros(batch, dtype=torch.long, device=device)
        decoder.prefill(chunk[:, :prefill], start)
        for t in range(prefill, width):
            logits = decoder.step(chunk[:, t], torch.tensor(t, device=device), start)
            total += F.cross_entropy(logits.float(), chunk[:, t + 1], reduction="sum").item()
            count += batch
    return total, count


@torch.no_grad()
def forward_nll(model, windows: torch.Tensor, prefill: int, batch_size: int = 8) -> tuple[float, int]:
    """The same positions scored by the model's own full forward (no cache): the reference point."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for first in range(0, windows.shape[0], batch_size):
        chunk = windows[first:first + batch_size].to(device)
        logits = model(chunk[:, :-1])[:, prefill:].float()  # predictions of tokens prefill+1..W
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), chunk[:, prefill + 1:].reshape(-1),
                                 reduction="sum").item()
        count += logits.shape[0] * logits.shape[1]
    return total, count


def kv_cache_quality(model, tokens: torch.Tensor, modes: list[str | KVQuantization], window: int, prefill: int,
                     n_windows: int, batch_size: int = 8, on_row=None) -> list[KVQuality]:
    """One row per mode (the first should be "bf16", the baseline of the deltas), then the model's
    own forward over the same positions (no cache) for reference. `on_row(row)` sees each row as
    it is measured (progress of a long CPU run)."""
    windows = windows_of(tokens, window, n_windows)
    heads, head_dim = _kv_shape(model)
    rows = []
    for mode in modes:
        quant = mode if isinstance(mode, KVQuantization) else kv_quantization(mode)
        total, count = teacher_forced_nll(model, windows, prefill, quant, batch_size)
        rows.append(KVQuality(quant.mode.value, total / count, count,
                              heads * quant.bytes_per_token(head_dim, context=window), _detail(quant, window)))
        if on_row is not None:
            on_row(rows[-1])
    total, count = forward_nll(model, windows, prefill, batch_size)
    rows.append(KVQuality("(forward)", total / count, count, float("nan"), "model forward, no cache"))
    return rows


def _detail(quant: KVQuantization, window: int) -> str:
    if quant.key_per_channel:
        return f"G={quant.group} R={quant.residual}"
    parts = []
    if quant.center_keys:
        values = "sym" if quant.value.symmetric else "asym"
        parts.append(f"values {quant.value.format} {values} g{quant.value.group_size}")
    if quant.sink:
        parts.append(f"first {quant.sink} token(s) in BF16 (sink)")
    once = [name for name, kept in (("mu", quant.center_keys), ("sink", quant.sink)) if kept]
    if once:  # per-sequence bytes, amortized over the window
        parts.append(f"{' and '.join(once)} amortized over {window} tokens")
    return "; ".join(parts)


def _kv_shape(model) -> tuple[int, int]:
    attn = model.layers[0].attn
    return int(attn.n_kv_heads), int(attn.head_dim)


def format_table(rows: list[KVQuality]) -> str:
    """Markdown: ppl, change vs the first row, bytes per token per layer and vs the first row."""
    base = rows[0]
    lines = ["| kv_cache | ppl | vs bf16 | bytes/token/layer | vs bf16 | notes |", "|---|---|---|---|---|---|"]
    for r in rows:
        ratio = r.bytes_per_token_per_layer / base.bytes_per_token_per_layer
        size = "-" if math.isnan(ratio) else f"{r.bytes_per_token_per_layer:.0f} | {ratio:.3f}x"
        size = "- | -" if size == "-" else size
        lines.append(f"| {r.mode} | {r.ppl:.4f} | {100 * (r.ppl / base.ppl - 1):+.2f}% | {size} | {r.detail} |")
    return "\n".join(lines)
