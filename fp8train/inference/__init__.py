"""Inference: generation with a static (optionally quantized) KV cache, and low-bit linears.

    from fp8train.inference import generate, SamplingConfig
    out = generate(model, [tokenizer.encode("def ")], max_new_tokens=64, kv_cache="int8")

Module map: protocol (what is read from a model, by duck typing), kv_modes (cache modes as core
QuantSpecs), kv_reference (layout + reference rules), kv_cache (StaticKVCache), rope, decoder
(IncrementalDecoder), plan (DecodePlan: fused decode step, low-bit weights), lowbit_matmul
(lowbit_linear dispatch), sampling, generation, cuda_graph, quality (two-pass KV perplexity).

Bottom layer: imports torch, fp8train.quant and kernels/ only; never fp8train.models / train.
docs/INFERENCE.md has the details and the numbers.
"""

from fp8train.inference.decoder import IncrementalDecoder
from fp8train.inference.generation import GenerationResult, generate
from fp8train.inference.kv_cache import StaticKVCache
from fp8train.inference.kv_modes import KVCacheMode, KVQuantization, kv_quantization
from fp8train.inference.lowbit_matmul import LowBitWeight, lowbit_linear, prepare_weight, quantize_weights
from fp8train.inference.plan import DecodePlan
from fp8train.inference.protocol import decoder_parts
from fp8train.inference.sampling import SamplingConfig

__all__ = ["DecodePlan", "GenerationResult", "IncrementalDecoder", "KVCacheMode", "KVQuantization", "LowBitWeight",
           "SamplingConfig", "StaticKVCache", "decoder_parts", "generate", "kv_quantization", "lowbit_linear",
           "prepare_weight", "quantize_weights"]
