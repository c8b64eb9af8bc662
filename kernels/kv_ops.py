"""Launchers of the KV-cache kernels (Triton only; the torch reference lives with the cache).

A layer's cache is passed as a `KVLayer` of tensors (fp8train/inference/kv_reference.py documents
the layout). Every launcher takes the slot of the first new token as a 0-d int64 device tensor
and never reads it on the host, so a decode step can be captured in a CUDA graph.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kernels._backend import kernel_backend
from kernels.launcher import next_power_of_2

MODES = {"bf16": 0, "fp8": 1, "int8": 2, "int4": 3, "int4_hadamard": 3, "kivi": 4, "int4_centered": 5}
LOG2_E = 1.4426950408889634


@dataclass
class KVLayer:
    """One layer's cache tensors; unused ones are None (see kv_reference.py for the layout)."""

    mode: str
    k_codes: torch.Tensor
    v_codes: torch.Tensor
    k_scale: torch.Tensor | None = None
    v_scale: torch.Tensor | None = None
    k_zero: torch.Tensor | None = None
    v_zero: torch.Tensor | None = None
    ring_k: torch.Tensor | None = None
    ring_v: torch.Tensor | None = None
    group: int = 0  # channels per factor (int4 / KIVI values)
    token_group: int = 0  # KIVI keys: tokens per factor
    residual: int = 0  # KIVI: newest tokens kept in bf16
    key_signs: torch.Tensor | None = None  # int4_hadamard: keys are written rotated (fp8train.quant.hadamard)
    key_mean: torch.Tensor | None = None  # int4_centered: [B, H, D] FP32, subtracted from every key written
    sink_k: torch.Tensor | None = None  # [B, H, SINK, D] bf16: the first SINK tokens of each row, exact
    sink_v: torch.Tensor | None = None

    @property
    def sink(self) -> int:
        return 0 if self.sink_k is None else self.sink_k.shape[2]

    @property
    def code(self) -> int:
        return MODES[self.mode]

    @property
    def slots(self) -> int:
        return self.k_codes.shape[2]

    @property
    def heads(self) -> int:
        return self.k_codes.shape[1]

    def ptr(self, name: str) -> torch.Tensor:
        """The tensor (FP8 codes as their bytes), or a placeholder for a pointer never dereferenced."""
        t = getattr(self, name)
        if t is None:
            return self.k_codes.view(torch.uint8) if self.k_codes.element_size() == 1 else self.k_codes
        return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


def _soft(x: torch.Tensor) -> bool:
    name, reason = kernel_backend(x)
    if name == "reference":
        raise RuntimeError(f"KV-cache kernels need Triton on this tensor: {reason}")
    return name == "triton-soft"


def kv_write(layer: KVLayer, k: torch.Tensor, v: torch.Tensor, slot: torch.Tensor,
             rope: tuple | None = None, start: torch.Tensor | None = None) -> None:
    """Write k, v [B, H, T, D] at slots slot..slot+T-1 (quantized per mode; KIVI: into the window).

    rope = (q [B, Hq, D] (strided heads), q_out [B, Hq, D] contiguous, cos, sin [max_len, D/2],
    start [B]) rotates k and q by position slot + t - start[b] first (decode, T = 1). Without
    rope, `start` [B] (row b's first valid slot) is read by centered keys and the sink."""
    from kernels.kv_cache_write import kv_write_kernel

    batch, heads, tokens, dim = k.shape
    assert k.stride() == v.stride() and k.stride(3) == 1, "k and v need the same strides, last dim contiguous"
    mode = layer.code
    ring = layer.ring_k.shape[2] if mode == MODES["kivi"] else 0
    kc, vc = (layer.ring_k, layer.ring_v) if ring else (layer.ptr("k_codes"), layer.ptr("v_codes"))
    if rope is None:
        q, q_out, cos, sin, rep = k, k, k, k, 1
        if start is None:
            if layer.key_mean is not None or layer.sink:
                raise ValueError(f"kv_write of kv_cache={layer.mode} (centered keys or a sink) needs start")
            start = slot
    else:
        q, q_out, cos, sin, start = rope
        rep = q.shape[1] // heads
        assert tokens == 1 and q.stride(2) == 1 and q_out.is_contiguous()
    kv_write_kernel[(batch * heads, tokens)](
        k, v, k.stride(0), k.stride(1), k.stride(2), kc, layer.ptr("k_scale"), layer.ptr("k_zero"),
        vc, layer.ptr("v_scale"), layer.ptr("v_zero"),
        slot, heads, layer.slots, ring, q, q.stride(0), q.stride(1), q_out, cos, sin, start,
        k if layer.key_signs is None else layer.key_signs, 1.0 / math.sqrt(dim),
        layer.ptr("key_mean"), layer.ptr("sink_k"), layer.ptr("sink_v"),
        MODE=mode, D=dim, GROUP=layer.group or dim, ROPE=rope is not None, REP=rep, SOFT=_soft(k),
        ROTATE_K=layer.key_signs is not None, LOG2_D=dim.bit_length() - 1,
        CENTER=layer.key_mean is not None, SINK=layer.sink)


def kivi_flush(layer: KVLayer, slot: torch.Tensor, source: tuple | None = None, groups: int = 0) -> None:
    """Quantize KIVI token groups. Decode (source None): the group that left the window when `slot`
    was written, if one did, read from the window. Prefill: groups [0, groups) of source = (k, v),
    each [B, H, T, D] with positions = slots."""
    from kernels.kv_cache_write import kivi_flush_kernel

    batch, heads = layer.k_codes.shape[:2]
    dim = layer.k_codes.shape[3] * 2
    if source is None:
        k, v, grid = layer.ring_k, layer.ring_v, (batch * heads, 1)
    else:
        k, v = source
        grid = (batch * heads, groups)
        if groups == 0:
            return
    assert k.stride() == v.stride() and k.stride(3) == 1
    kivi_flush_kernel[grid](k, v, k.stride(0), k.stride(1), k.stride(2), layer.k_codes, layer.k_scale,
                            layer.k_zero, layer.v_codes, layer.v_scale, layer.v_zero, slot, heads, layer.slots,
                            layer.ring_k.shape[2], layer.residual, D=dim, G=layer.token_group,
                            DYNAMIC=source is None)


def kv_decode_attention(q: torch.Tensor, layer: KVLayer, start: torch.Tensor, slot: torch.Tensor,
                        splits: int | None = None, block_n: int = 64, num_warps: int = 4,
                        num_stages: int = 2) -> torch.Tensor:
    """Attention of q [B, Hq, D] (one token per row) over slots [start[b], slot] of the cache."""
    from kernels.kv_attention import kv_attention_kernel, kv_attention_reduce_kernel

    batch, q_heads, dim = q.shape
    heads = layer.heads
    rep = q_heads // heads
    check_block_n(block_n)
    if splits is None:
        splits = default_splits(batch * heads, layer.slots, block_n)
    parts = splits + (1 if layer.mode == "kivi" or layer.sink else 0)
    window_k, window_v = (layer.sink_k, layer.sink_v) if layer.sink else (layer.ring_k, layer.ring_v)
    m = torch.empty(batch * q_heads * parts, device=q.device, dtype=torch.float32)
    l_sum = torch.empty_like(m)
    acc = torch.empty(batch * q_heads * parts, dim, device=q.device, dtype=torch.float32)
    kv_attention_kernel[(batch * heads, parts)](
        q, q.stride(0), q.stride(1), layer.ptr("k_codes"), layer.ptr("k_scale"), layer.ptr("k_zero"),
        layer.ptr("v_codes"), layer.ptr("v_scale"), layer.ptr("v_zero"),
        layer.ptr("ring_k") if window_k is None else window_k, layer.ptr("ring_v") if window_v is None else window_v,
        start, slot,
        m, l_sum, acc, heads, layer.slots, window_k.shape[2] if window_k is not None else 1,
        layer.residual, LOG2_E / math.sqrt(dim),
        splits, parts, MODE=layer.code, D=dim, GROUP=layer.group or dim, KG=layer.token_group or 1, REP=rep,
        BLOCK_H=max(16, next_power_of_2(rep)), BLOCK_N=block_n, SINK=layer.sink, num_warps=num_warps,
        num_stages=num_stages)
    out = torch.empty(batch, q_heads, dim, device=q.device, dtype=q.dtype)
    kv_attention_reduce_kernel[(batch * q_heads,)](m, l_sum, acc, out, parts, BLOCK_P=next_power_of_2(parts), D=dim)
    return out


def _power_of_2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def check_kernel_sizes(mode: str, head_dim: int, group: int = 0, token_group: int = 0) -> tuple[bool, str]:
    """(ok, reason): can the cache kernels serve this cache? Triton tiles are powers of two, and every
    tensor-core dot of the decode attention needs K, N >= 16: head_dim >= 16 (4-bit modes split it in
    even / odd halves: >= 32), channel groups and KIVI's token group powers of two."""
    if not _power_of_2(head_dim):
        return False, f"head_dim={head_dim} is not a power of 2 (Triton tiles)"
    halves = mode in ("int4", "int4_hadamard", "kivi", "int4_centered")  # 4-bit: dots over D/2 (even / odd)
    if head_dim < (32 if halves else 16):
        return False, (f"head_dim={head_dim} < {32 if halves else 16}: a tensor-core dot needs K >= 16"
                       + (f" ({mode} splits even / odd halves)" if halves else ""))
    for name, size in (("channel group", group), ("KIVI token group", token_group)):
        if size and not _power_of_2(size):
            return False, f"{name}={size} is not a power of 2 (Triton tiles)"
    return True, "sizes fit the kernels"


def check_block_n(block_n: int) -> None:
    if not _power_of_2(block_n) or block_n < 16:
        raise ValueError(f"block_n={block_n}: the decode attention needs a power of 2 >= 16 (tensor-core dots "
                         f"with N, K >= 16), e.g. 16, 32, 64, 128")


def default_splits(programs: int, slots: int, block_n: int, target: int = 528) -> int:
    """Splits of the context so that about `target` programs run (4 per SM on an H100), each with
    at least one tile; a power of two so the compiled variants stay few."""
    want = max(1, target // max(programs, 1))
    return max(1, min(next_power_of_2(want), next_power_of_2(max(1, slots // block_n))))
