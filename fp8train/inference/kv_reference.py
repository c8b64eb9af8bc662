"""The reference KV-cache write and read: the core's quantizers applied to the cache layout.

Layout of one layer (B batch rows, H KV heads, S slots, D = head_dim; `Dc` = D for 8-bit codes,
D / 2 for 4-bit codes packed two a byte, low nibble = even channel, see fp8train.quant.packing):

    per-token modes  codes [B, H, S, Dc]   scale [B, H, S, F]   (zero [B, H, S, F] if asymmetric)
                     F = 1 (ROW) or D / g (TILE g along head_dim)
    KIVI keys        codes [B, H, S, D/2]  scale, zero [B, H, S / G, D]   (per channel per token group)
    KIVI values      codes [B, H, S, D/2]  scale, zero [B, H, S, D / G]
    KIVI window      ring_k, ring_v [B, H, W, D] bf16, position p in slot p % W (W = R + G)
    int4_centered    per-token codes of R (k - mu); key_mean mu [B, H, D] fp32 (in the cache object)
    bf16             k, v [B, H, S, D]

`scale` is what `QuantizedTensor.scale_inv` holds (FP8: 1 / scale; integers: the step), so a
stored vector decodes as (codes - zero) * scale: the core's `QuantizedTensor.dequantize`.

KIVI positions: with n tokens written, positions [0, Q(n)) are quantized and [Q(n), n) sit in the
window, Q(n) = G * floor(max(n - R, 0) / G). A write of positions [s0, n) first quantizes the groups
[Q(s0), Q(n)) (tokens from the window or from the new input) and then puts the newest tokens in the
window. The Triton kernels (kernels/kv_cache_write.py, kernels/kv_attention.py) follow exactly these
rules; tests compare their codes with these functions bit for bit.
"""

from __future__ import annotations

import math

import torch

from fp8train.inference.kv_modes import KVQuantization
from kernels.kv_ops import KVLayer
from fp8train.quant.granularity import Granularity, GranularityKind
from fp8train.quant.packing import pack_4bit, unpack_4bit
from fp8train.quant.spec import QuantSpec
from fp8train.quant.tensor import QuantizedTensor


def quantized_before(n: int, quant: KVQuantization) -> int:
    """Q(n): how many leading positions a KIVI cache holding n tokens has quantized."""
    group = quant.group
    return group * (max(n - quant.residual, 0) // group)


def quantize_tokens(x: torch.Tensor, spec: QuantSpec):
    """x [N, D] -> (codes [N, Dc], scale [N, F] fp32, zero [N, F] uint8 or None), per token."""
    qt = spec.quantize(x)
    codes = pack_4bit(qt.data) if spec.bits == 4 else qt.data
    return codes, qt.scale_inv.reshape(x.shape[0], -1), qt.zero_point


def dequantize_tokens(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                      spec: QuantSpec) -> torch.Tensor:
    """Inverse layout of `quantize_tokens`: FP32 [N, D] through QuantizedTensor.dequantize."""
    data = unpack_4bit(codes, spec.fmt) if spec.bits == 4 else codes
    shape = spec.grid.scale_shape(*data.shape)
    return QuantizedTensor(data, scale.reshape(shape), spec.grid, spec.fmt,
                           None if zero is None else zero.reshape(shape)).dequantize()


def quantize_key_groups(k: torch.Tensor, spec: QuantSpec):
    """KIVI keys k [N, G, D] (N groups of G tokens) -> codes [N, G, D/2], scale, zero [N, D].

    Per channel over the G tokens of a group: TILE(G) quantization of each group's k^T [D, G]."""
    groups, size, dim = k.shape
    kt = k.transpose(1, 2).reshape(groups * dim, size)  # [N*D, G]: one row per (group, channel)
    qt = QuantSpec(spec.format, GranularityKind.TILE, size, spec.symmetric).quantize(kt)
    codes = qt.data.reshape(groups, dim, size).transpose(1, 2).reshape(groups * size, dim)
    zero = qt.zero_point.reshape(groups, dim) if qt.zero_point is not None else None
    return pack_4bit(codes).reshape(groups, size, dim // 2), qt.scale_inv.reshape(groups, dim), zero


def dequantize_key_groups(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                          spec: QuantSpec) -> torch.Tensor:
    """Inverse of `quantize_key_groups`: codes [N, G, D/2], scale/zero [N, D] -> FP32 [N, G, D]."""
    groups, size, half = codes.shape
    data = unpack_4bit(codes.reshape(groups * size, half), spec.fmt).reshape(groups, size, 2 * half)
    data_t = data.transpose(1, 2).reshape(groups * 2 * half, size)
    qt = QuantizedTensor(data_t, scale.reshape(-1, 1), Granularity.tile(size), spec.fmt,
                         None if zero is None else zero.reshape(-1, 1))
    return qt.dequantize().reshape(groups, 2 * half, size).transpose(1, 2)


def write_tokens(store, x: torch.Tensor, s0: int, spec: QuantSpec) -> None:
    """Per-token modes: x [B, H, T, D] into slots [s0, s0 + T) of one layer's (codes, scale, zero)."""
    codes_out, scale_out, zero_out = store
    batch, heads, tokens, dim = x.shape
    codes, scale, zero = quantize_tokens(x.reshape(-1, dim), spec)
    codes_out[:, :, s0:s0 + tokens] = codes.reshape(batch, heads, tokens, -1)
    scale_out[:, :, s0:s0 + tokens] = scale.reshape(batch, heads, tokens, -1)
    if zero_out is not None:
        zero_out[:, :, s0:s0 + tokens] = zero.reshape(batch, heads, tokens, -1)


def read_tokens(store, n: int, spec: QuantSpec) -> torch.Tensor:
    """Per-token modes: slots [0, n) of one layer dequantized, FP32 [B, H, n, D]."""
    codes, scale, zero = (None if t is None else t[:, :, :n] for t in store)
    batch, heads = codes.shape[:2]
    flat = dequantize_tokens(codes.reshape(batch * heads * n, -1), scale.reshape(batch * heads * n, -1),
                             None if zero is None else zero.reshape(batch * heads * n, -1), spec)
    return flat.reshape(batch, heads, n, -1)


def valid_slots(start: torch.Tensor, s0: int, tokens: int) -> torch.Tensor:
    """Boolean [B, 1, T, 1]: slot s0 + t holds a token of row b (not left padding), s0 + t >= start[b]."""
    slots = torch.arange(s0, s0 + tokens, device=start.device)
    return (slots[None, :] >= start[:, None])[:, None, :, None]


def prompt_key_mean(k: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """int4_centered's mu: the mean of a prefill's keys k [B, H, T, D] (slots 0..T-1) over each row's
    valid slots >= start[b], FP32 [B, H, D]. A row's mean does not depend on the padding in front of
    it; a one-token prompt's mean is its key (which then stores as zeros, exactly)."""
    valid = valid_slots(start, 0, k.shape[2])
    count = valid.sum(dim=2).clamp(min=1)  # [B, 1, 1]
    return ((k.double() * valid).sum(dim=2) / count).float()  # FP64: the same bits whatever the padding


def center_keys(k: torch.Tensor, mu: torch.Tensor, s0: int, start: torch.Tensor | None) -> torch.Tensor:
    """k [B, H, T, D] at slots s0.. minus mu [B, H, D]; padded slots stay zero (like every mode's)."""
    centered = k.float() - mu[:, :, None, :]
    return centered if start is None else centered * valid_slots(start, s0, k.shape[2])


def kivi_write(layer: KVLayer, k: torch.Tensor, v: torch.Tensor, s0: int, quant: KVQuantization) -> None:
    """KIVI: positions [s0, s0 + T) of k, v [B, H, T, D] into one layer (see the module docstring)."""
    group, window = quant.group, quant.window
    n = s0 + k.shape[2]
    q_old, q_new = quantized_before(s0, quant), quantized_before(n, quant)
    first = q_old  # the tokens we need: [q_old, n), old ones from the window
    old = [p % window for p in range(first, s0)]
    full_k = torch.cat([layer.ring_k[:, :, old].float(), k.float()], dim=2)  # positions [first, n)
    full_v = torch.cat([layer.ring_v[:, :, old].float(), v.float()], dim=2)
    if q_new > q_old:
        _kivi_quantize_groups(layer, full_k[:, :, :q_new - first], full_v[:, :, :q_new - first], q_old, quant)
    keep = range(max(first, n - window), n)
    slots = [p % window for p in keep]
    layer.ring_k[:, :, slots] = full_k[:, :, keep.start - first:].to(layer.ring_k.dtype)
    layer.ring_v[:, :, slots] = full_v[:, :, keep.start - first:].to(layer.ring_v.dtype)


def _kivi_quantize_groups(layer: KVLayer, k: torch.Tensor, v: torch.Tensor, start: int, quant: KVQuantization) -> None:
    """Quantize whole groups: k, v [B, H, m*G, D] are positions [start, start + m*G)."""
    batch, heads, tokens, dim = k.shape
    group = quant.group
    n_groups = tokens // group
    codes, scale, zero = quantize_key_groups(k.reshape(-1, group, dim), quant.key)
    g0 = start // group
    layer.k_codes[:, :, start:start + tokens] = codes.reshape(batch, heads, tokens, dim // 2)
    layer.k_scale[:, :, g0:g0 + n_groups] = scale.reshape(batch, heads, n_groups, dim)
    layer.k_zero[:, :, g0:g0 + n_groups] = zero.reshape(batch, heads, n_groups, dim)
    write_tokens((layer.v_codes, layer.v_scale, layer.v_zero), v, start, quant.value)


def kivi_read(layer: KVLayer, n: int, quant: KVQuantization) -> tuple[torch.Tensor, torch.Tensor]:
    """KIVI: positions [0, n) of one layer, FP32 [B, H, n, D] each."""
    group, window = quant.group, quant.window
    q = quantized_before(n, quant)
    batch, heads = layer.k_codes.shape[:2]
    ks, vs = [], []
    if q:
        codes = layer.k_codes[:, :, :q].reshape(-1, group, layer.k_codes.shape[-1])
        k = dequantize_key_groups(codes, layer.k_scale[:, :, :q // group].reshape(-1, codes.shape[-1] * 2),
                                  layer.k_zero[:, :, :q // group].reshape(-1, codes.shape[-1] * 2), quant.key)
        ks.append(k.reshape(batch, heads, q, -1))
        vs.append(read_tokens((layer.v_codes, layer.v_scale, layer.v_zero), q, quant.value))
    slots = [p % window for p in range(q, n)]
    ks.append(layer.ring_k[:, :, slots].float())
    vs.append(layer.ring_v[:, :, slots].float())
    return torch.cat(ks, dim=2), torch.cat(vs, dim=2)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """Decode attention in FP32: q [B, Hq, D] over k, v [B, H, n, D]; slots < start[b] are masked.

    GQA: query head h reads KV head h // (Hq / H) (consecutive query heads share one KV head)."""
    batch, q_heads, dim = q.shape
    repeats = q_heads // k.shape[1]
    k = k.float().repeat_interleave(repeats, dim=1)  # [B, Hq, n, D]
    v = v.float().repeat_interleave(repeats, dim=1)
    scores = torch.einsum("bhd,bhnd->bhn", q.float(), k) / math.sqrt(dim)
    slots = torch.arange(k.shape[2], device=q.device)
    masked = slots[None, :] < start.to(q.device)[:, None]  # [B, n]
    scores = scores.masked_fill(masked[:, None, :], float("-inf"))
    return torch.einsum("bhn,bhnd->bhd", scores.softmax(dim=-1), v)
