"""generate(): a batch of prompts -> continuations, with a static (optionally quantized) KV cache.

    out = generate(model, [tok.encode("def "), tok.encode("import")], max_new_tokens=64,
                   kv_cache="int8", sampling=SamplingConfig(temperature=0.8, top_p=0.95, seed=1),
                   eos_id=tok.eos_id, on_step=print_new_text)

Prompts are LEFT-padded to the longest one, so every row writes the same slot at each step (one
0-d slot tensor, static shapes); row b's tokens start at slot start[b] = longest - len(prompt b)
and padded slots are masked. The cache holds longest + max_new_tokens slots, which must fit the
model's max_seq_len. A row stops at its first eos (it keeps stepping, ignored, until every row is
done or max_new_tokens is reached). On CUDA with the cache kernels the decode step is replayed
from a CUDA graph (`cuda_graph=False` to disable); `on_step(step, tokens)` streams each step's
tokens (a list of ints, one per row) as they come.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from fp8train.inference.cuda_graph import GraphedStep
from fp8train.inference.decoder import IncrementalDecoder
from fp8train.inference.kv_cache import StaticKVCache
from fp8train.inference.kv_modes import KVQuantization, kv_quantization
from fp8train.inference.protocol import decoder_parts
from fp8train.inference.sampling import SamplingConfig, sample

PAD_ID = 0  # any id works: padded slots are masked


@dataclass
class GenerationResult:
    tokens: list[list[int]]  # generated tokens per prompt (up to and including eos)
    steps: int
    graph: str = "off"  # "captured", "off", or why capture failed
    notes: list[str] = field(default_factory=list)


def left_pad(prompts: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids [B, T] left-padded with PAD_ID, start [B]) for prompts of lengths >= 1."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    longest = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), longest), PAD_ID, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, longest - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
    start = torch.tensor([longest - len(p) for p in prompts], dtype=torch.long)
    return ids.to(device), start.to(device)


def make_cache(model, quant: KVQuantization, batch: int, max_len: int,
               use_kernels: bool | None = None) -> StaticKVCache:
    parts = decoder_parts(model)
    if max_len > parts.max_seq_len:
        raise ValueError(f"prompt + max_new_tokens = {max_len} tokens exceeds the model's max_seq_len="
                         f"{parts.max_seq_len}; shorten the prompt or lower max_new_tokens")
    return StaticKVCache(quant, parts.n_layers, batch, parts.n_kv_heads, max_len, parts.head_dim,
                         parts.cos.device, use_kernels=use_kernels)


@torch.no_grad()
def generate(model, prompts: list[list[int]], max_new_tokens: int, kv_cache: str | KVQuantization = "bf16",
             sampling: SamplingConfig = SamplingConfig(), eos_id: int | None = None,
             on_step: Callable[[int, list[int]], None] | None = None, cuda_graph: bool = True,
             plan=None) -> GenerationResult:
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an int >= 1")
    quant = kv_cache if isinstance(kv_cache, KVQuantization) else kv_quantization(kv_cache)
    device = decoder_parts(model).cos.device
    ids, start = left_pad(prompts, device)
    cache = make_cache(model, quant, len(prompts), ids.shape[1] + max_new_tokens)
    decoder = IncrementalDecoder(model, cache, plan)
    generator = sampling.generator(device)
    step_fn = decoder.step
    graphed = cuda_graph and device.type == "cuda" and cache.use_kernels
    if graphed:
        step_fn = GraphedStep(decoder.step)
    slots = torch.arange(ids.shape[1] + max_new_tokens, device=device)
    token = sample(decoder.prefill(ids, start)[:, -1].float(), sampling, generator)
    out: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    steps = 0
    for steps in range(1, max_new_tokens + 1):
        host = token.tolist()
        for row, t in enumerate(host):
            if not done[row]:
                out[row].append(t)
                done[row] = eos_id is not None and t == eos_id
        if on_step is not None:
            on_step(steps, host)
        if all(done) or steps == max_new_tokens:
            break
        slot = slots[ids.shape[1] + steps - 1]
        token = sample(step_fn(token, slot, start).float(), sampling, generator)
    graph = "off" if not graphed else (step_fn.failure or "captured")
    return GenerationResult(out, steps, graph)
