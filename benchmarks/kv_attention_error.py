"""Attention-probability error of each KV-cache mode's keys: a one-forward proxy for kv_quality.py.

    python benchmarks/kv_attention_error.py --modes int8,int4,int4_hadamard,int4_centered,kivi:0

kv_quality.py measures perplexity (minutes per mode on a CPU); this measures, in seconds, how far
each mode's stored keys move the attention probabilities. One window of SmolLM2-135M is prefilled
in full precision while every layer's queries and keys (RoPE applied) are captured. For each mode
the keys go through a cache of that mode: the first `--prefill` tokens in one write at slot 0 (the
prompt: int4_centered takes its mean key from it), the rest in a second write, as decoding would
store them; `read()` returns them in the model's basis. The number per mode is the total-variation
distance 0.5 * sum_j |p_j - p'_j| between the causal attention probabilities with the exact and the
cached keys, averaged over queries, heads and layers (the max is over layers). Values are not
quantized here: the proxy isolates the keys, where the 4-bit loss sits (docs/INFERENCE.md).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.kv_quality import parse_mode, smollm2_and_text  # noqa: E402
from fp8train.inference import decoder as decoder_module  # noqa: E402
from fp8train.inference.decoder import IncrementalDecoder  # noqa: E402
from fp8train.inference.generation import make_cache  # noqa: E402
from fp8train.inference.kv_cache import StaticKVCache  # noqa: E402
from fp8train.inference.kv_modes import kv_quantization  # noqa: E402


@contextlib.contextmanager
def captured_prompt_attention(into: list):
    """Record (q, k) of every prefill attention call (one per layer, in order)."""
    original = decoder_module.prompt_attention

    def record(q, k, v, mask):
        into.append((q.float(), k.float()))
        return original(q, k, v, mask)

    decoder_module.prompt_attention = record
    try:
        yield into
    finally:
        decoder_module.prompt_attention = original


def causal_probs(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Attention probabilities [B, Hq, T, T] of q [B, Hq, T, D] over k [B, H, T, D] (GQA repeat)."""
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    tokens = scores.shape[-1]
    future = torch.triu(torch.ones(tokens, tokens, dtype=torch.bool), 1)
    return scores.masked_fill(future, float("-inf")).softmax(-1)


def cached_keys(quant, k: torch.Tensor, prefill: int) -> torch.Tensor:
    """k [B, H, T, D] written through a cache of `quant` (prompt, then the rest) and read back."""
    batch, heads, tokens, dim = k.shape
    cache = StaticKVCache(quant, 1, batch, heads, tokens, dim)
    zeros = torch.zeros_like(k)
    cache.write(0, k[:, :, :prefill], zeros[:, :, :prefill], 0)
    cache.write(0, k[:, :, prefill:], zeros[:, :, prefill:], prefill)
    return cache.read(0, tokens)[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--prefill", type=int, default=64)
    ap.add_argument("--which", type=int, default=1, help="which window of the held-out text (0 = first)")
    ap.add_argument("--modes", default="int8,int4,int4_hadamard,int4_centered,kivi:0")
    args = ap.parse_args()
    t0 = time.time()
    model, tokens, source = smollm2_and_text(args.window * (args.which + 1) + 1)
    ids = tokens[args.window * args.which: args.window * (args.which + 1)][None]
    decoder = IncrementalDecoder(model, make_cache(model, kv_quantization("bf16"), 1, args.window))
    with torch.no_grad(), captured_prompt_attention([]) as layers:
        decoder.prefill(ids, torch.zeros(1, dtype=torch.long))
    print(f"SmolLM2-135M, {source}, window {args.which} ({args.window} tokens), prefill {args.prefill}, "
          f"{len(layers)} layers\n\n| kv_cache keys | mean TV | max TV (layer) |\n|---|---|---|")
    for name in args.modes.split(","):
        quant = parse_mode(name)
        errors = []
        for q, k in layers:
            exact = causal_probs(q, k)
            approx = causal_probs(q, cached_keys(quant, k, args.prefill))
            errors.append(0.5 * (approx - exact).abs().sum(-1).mean().item())
        print(f"| {name} | {sum(errors) / len(errors):.4f} | {max(errors):.4f} |", flush=True)
    print(f"\n({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
