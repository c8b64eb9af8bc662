"""Inference: generation with a static (optionally quantized) KV cache, and low-bit linears.

Bottom layer: imports torch, fp8train.quant and kernels/ only. It drives a decoder through a small
duck-typed protocol (protocol.py), never by importing fp8train.models.
"""
