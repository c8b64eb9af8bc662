"""StaticKVCache: one preallocated (optionally quantized) KV cache for every layer of a decoder.

    cache = StaticKVCache(kv_quantization("int8"), n_layers=16, batch=4, n_kv_heads=16,
                          max_len=2048, head_dim=128, device="cuda")
    cache.write(layer, k, v, 0, start)                 # prefill: k, v [B, H, T, D] at slots 0..T-1
    q_rot = cache.write_rotary(layer, q, k, v, slot, cos, sin, start)   # decode: RoPE + write
    out = cache.attend(layer, q_rot, slot, start)      # attention over slots start[b]..slot

Storage is allocated once, [layers, batch, kv_heads, slots, ...] per tensor (layouts in
kv_reference.py), and never reallocated: a decode step has static shapes and the current slot is a
0-d device tensor, so the step can be captured in a CUDA graph. Slots are shared by the batch rows
(left padding: row b's tokens start at slot start[b]; earlier slots are masked).

Two implementations of every operation, one layout: the Triton kernels (kernels/kv_ops.py;
quantization fused into the write, dequantization into the attention read) on CUDA, and the
reference (kv_reference.py: the core's quantizers, FP32 attention) elsewhere; `backend` says
which and why. The kernels match the reference's codes bit for bit (tests/kernels).

`int4_centered` (kv_modes.py) keeps one more tensor, `key_mean` [L, B, H, D] FP32: the mean key of
the prompt, set by the write at slot 0 (the prefill) over each row's valid slots >= start[b], and
subtracted from every key written after it (by the write kernel on the Triton path). A mode with
BF16 sink tokens (`quant.sink`, kv_modes.py) keeps `sink_k`, `sink_v` [L, B, H, sink, D] BF16:
position p < sink of row b (slot start[b] + p) as the quantizer saw it (keys centered and rotated
where the mode does that), which attention and reads take in place of its codes.
"""

from __future__ import annotations

import math

import torch

from fp8train.inference import kv_reference as ref
from fp8train.inference.kv_modes import KVCacheMode, KVQuantization
from fp8train.inference.rope import rotate
from fp8train.quant.hadamard import hadamard_matrix, hadamard_transform, inverse_hadamard_transform, random_signs
from kernels.kv_ops import KVLayer

_CODE_DTYPES = {"e4m3": torch.float8_e4m3fn, "int8": torch.int8, "int4": torch.uint8, "uint4": torch.uint8}


def kernels_usable(device: torch.device, quant: KVQuantization, head_dim: int,
                   forced: bool = False) -> tuple[bool, str]:
    """(ok, reason): do the Triton cache kernels serve this cache on `device` by default? On a CPU
    they run only through Triton's interpreter (tests), and only when `forced`; anywhere, only for
    sizes the kernels take (powers of two, tensor-core dots >= 16: kernels/kv_ops.py)."""
    from kernels._backend import kernel_backend
    from kernels.kv_ops import check_kernel_sizes

    if device.type != "cuda" and not forced:
        return False, f"{device} tensors: the reference path (kernels run on CUDA)"
    name, reason = kernel_backend(torch.empty(0, device=device))
    fits, why = check_kernel_sizes(quant.mode.value, head_dim, quant.channel_group, quant.group)
    if not fits:
        return False, f"kv_cache={quant.mode.value}: {why}; the reference path serves it"
    return name != "reference", reason


class StaticKVCache:
    def __init__(self, quant: KVQuantization, n_layers: int, batch: int, n_kv_heads: int, max_len: int,
                 head_dim: int, device: str | torch.device = "cpu", use_kernels: bool | None = None):
        quant.check_head_dim(head_dim)
        if quant.key_per_channel:  # whole token groups
            max_len = quant.group * math.ceil(max_len / quant.group)
        self.quant, self.n_layers, self.batch, self.n_kv_heads = quant, n_layers, batch, n_kv_heads
        self.max_len, self.head_dim, self.device = max_len, head_dim, torch.device(device)
        # int4_hadamard: keys are stored rotated by R = H diag(s) / sqrt(D); queries meet them rotated
        self.key_signs = random_signs(head_dim, device=self.device) if quant.rotate_keys else None
        self._query_rotation = hadamard_matrix(self.key_signs) if quant.rotate_keys else None
        self._sink_start: torch.Tensor | None = None  # the rows' start slots the sink was written with
        self._mu_set = [False] * n_layers  # int4_centered: a write at slot 0 has set the layer's mu
        ok, reason = kernels_usable(self.device, quant, head_dim, forced=bool(use_kernels))
        if use_kernels and not ok:
            raise ValueError(f"use_kernels=True but the cache kernels cannot run: {reason}")
        self.use_kernels = ok if use_kernels is None else use_kernels
        self.backend = ("triton", reason) if self.use_kernels else ("reference", reason)
        self._layers = self._allocate()
        # int4_centered: the prompt's mean key per (layer, row, KV head), in the model's basis;
        # the BF16 sink: the first quant.sink positions of each row
        self.key_mean = self.storage.get("key_mean")
        self.sink_k, self.sink_v = self.storage.get("sink_k"), self.storage.get("sink_v")

    def _zeros(self, *tail: int, dtype: torch.dtype) -> torch.Tensor:
        shape = (self.n_layers, self.batch, self.n_kv_heads, *tail)
        return torch.zeros(shape, dtype=dtype, device=self.device)

    def _allocate(self) -> list[KVLayer]:
        quant, s, d = self.quant, self.max_len, self.head_dim
        if not quant.quantized:
            t = {"k_codes": self._zeros(s, d, dtype=torch.bfloat16), "v_codes": self._zeros(s, d, dtype=torch.bfloat16)}
            return self._split(t)
        factors = quant.value_groups(d)
        t = {"k_codes": self._codes(quant.key), "v_codes": self._codes(quant.value),
             "v_scale": self._zeros(s, factors, dtype=torch.float32)}
        if quant.key_per_channel:
            t["k_scale"] = self._zeros(s // quant.group, d, dtype=torch.float32)
            t["k_zero"] = self._zeros(s // quant.group, d, dtype=torch.uint8)
            t["ring_k"] = self._zeros(quant.window, d, dtype=torch.bfloat16)
            t["ring_v"] = self._zeros(quant.window, d, dtype=torch.bfloat16)
        else:
            t["k_scale"] = self._zeros(s, factors, dtype=torch.float32)
            if not quant.key.symmetric:
                t["k_zero"] = self._zeros(s, factors, dtype=torch.uint8)
        if not quant.value.symmetric:
            t["v_zero"] = self._zeros(s, factors, dtype=torch.uint8)
        if quant.center_keys:
            t["key_mean"] = self._zeros(d, dtype=torch.float32)
        if quant.sink:
            t["sink_k"] = self._zeros(quant.sink, d, dtype=torch.bfloat16)
            t["sink_v"] = self._zeros(quant.sink, d, dtype=torch.bfloat16)
        return self._split(t)

    def _codes(self, spec) -> torch.Tensor:
        """Codes of one tensor: [.., S, D] bytes (4-bit: [.., S, D / 2], two codes a byte)."""
        width = self.head_dim // 2 if spec.bits == 4 else self.head_dim
        return self._zeros(self.max_len, width, dtype=_CODE_DTYPES[spec.format])

    def _split(self, tensors: dict[str, torch.Tensor]) -> list[KVLayer]:
        self.storage = tensors
        quant = self.quant
        return [KVLayer(mode=quant.mode.value, group=quant.channel_group, token_group=quant.group, residual=quant.residual,
                        key_signs=self.key_signs, **{name: t[i] for name, t in tensors.items()})
                for i in range(self.n_layers)]

    def layer(self, index: int) -> KVLayer:
        return self._layers[index]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.storage.values())

    def bytes_per_token_per_layer(self) -> float:
        """Bytes one token adds to one layer (all KV heads), KIVI's window excluded (a constant);
        int4_centered's mean key amortized over the cache's max_len slots."""
        return self.n_kv_heads * self.quant.bytes_per_token(self.head_dim, context=self.max_len)

    # ---- writes ---------------------------------------------------------------------------------
    def write(self, index: int, k: torch.Tensor, v: torch.Tensor, slot: int | torch.Tensor,
              start: torch.Tensor | None = None) -> None:
        """k, v [B, H, T, D] (RoPE already applied) into slots slot..slot+T-1 of layer `index`;
        `start` [B]: row b's first valid slot (left padding; None: 0), read by int4_centered's prefill.

        KIVI quantizes the BF16 values (the window's precision), so a group gets the same codes
        whether a prefill quantizes it directly or a decode step flushes it from the window."""
        layer = self._layers[index]
        if start is None and (self.key_mean is not None or self.sink_k is not None):
            start = torch.zeros(k.shape[0], dtype=torch.long, device=k.device)
        if self.sink_k is not None:
            self._sink_start = start
        if self.key_mean is not None and int(slot) == 0:  # the prefill sets mu
            self.key_mean[index] = ref.prompt_key_mean(k, start)
            self._mu_set[index] = True
        if self.quant.key_per_channel:
            k, v = k.to(torch.bfloat16), v.to(torch.bfloat16)
        if self.use_kernels:  # the write kernel centers, rotates and keeps the sink itself
            self._write_kernels(layer, k, v, slot, start)
            return
        if self.key_mean is not None:
            k = ref.center_keys(k, self.key_mean[index], int(slot), start)
        if self.key_signs is not None:
            k = hadamard_transform(k, self.key_signs)
        if self.sink_k is not None:
            self._keep_sink(index, k, v, int(slot), start)
        if self.quant.mode is KVCacheMode.KIVI:
            ref.kivi_write(layer, k, v, int(slot), self.quant)
        elif not self.quant.quantized:
            s0 = int(slot)
            layer.k_codes[:, :, s0:s0 + k.shape[2]] = k.to(torch.bfloat16)
            layer.v_codes[:, :, s0:s0 + k.shape[2]] = v.to(torch.bfloat16)
        else:
            s0 = int(slot)
            ref.write_tokens((layer.k_codes, layer.k_scale, layer.k_zero), k, s0, self.quant.key)
            ref.write_tokens((layer.v_codes, layer.v_scale, layer.v_zero), v, s0, self.quant.value)

    def _write_kernels(self, layer: KVLayer, k: torch.Tensor, v: torch.Tensor, slot, start) -> None:
        from kernels import kv_ops

        k, v = _same_strides(k, v)
        if not isinstance(slot, torch.Tensor):
            slot = torch.tensor(slot, device=k.device, dtype=torch.int64)
        if self.quant.mode is not KVCacheMode.KIVI:
            kv_ops.kv_write(layer, k, v, slot, start=start)
            return
        tokens = k.shape[2]
        if tokens == 1:  # decode: into the window, then flush the group that left it (if any)
            kv_ops.kv_write(layer, k, v, slot)
            kv_ops.kivi_flush(layer, slot)
            return
        if int(slot) != 0:  # prefill (host-side slot): whole groups straight from the input
            raise ValueError(f"a multi-token KIVI write on the kernels must be a prefill at slot 0, got slot "
                             f"{int(slot)}; write later tokens one step at a time")
        groups = ref.quantized_before(tokens, self.quant) // self.quant.group
        kv_ops.kivi_flush(layer, slot, source=(k, v), groups=groups)
        keep = min(tokens, self.quant.window)
        tail = torch.tensor(tokens - keep, device=k.device, dtype=torch.int64)
        kv_ops.kv_write(layer, k[:, :, tokens - keep:], v[:, :, tokens - keep:], tail)

    def write_rotary(self, index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot: torch.Tensor,
                     cos: torch.Tensor, sin: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
        """Decode: q [B, Hq, D], k, v [B, H, D] of ONE new token at `slot` (0-d tensor), not yet
        rotated. Rotates q and k by position slot - start[b], writes k and v; returns rotated q."""
        positions = (slot - start).clamp(min=0)[:, None]  # [B, 1]
        if not self.use_kernels or (self.key_mean is not None and not self._mu_set[index]):
            # (int4_centered without a prefill: this first token is the prompt, and write() takes mu from it)
            q_rot = rotate(q[:, None], cos, sin, positions)[:, 0]
            k_rot = rotate(k[:, None], cos, sin, positions)[:, 0]
            self.write(index, k_rot[:, :, None], v[:, :, None], slot, start)
            return q_rot
        from kernels import kv_ops

        layer = self._layers[index]
        if self.sink_k is not None:
            self._sink_start = start
        q_out = torch.empty(q.shape, device=q.device, dtype=q.dtype)
        k4, v4 = _same_strides(k[:, :, None], v[:, :, None])
        kv_ops.kv_write(layer, k4, v4, slot, rope=(q, q_out, cos, sin, start))
        if self.quant.mode is KVCacheMode.KIVI:
            kv_ops.kivi_flush(layer, slot)
        return q_out

    # ---- reads ----------------------------------------------------------------------------------
    def attend(self, index: int, q: torch.Tensor, slot: int | torch.Tensor, start: torch.Tensor,
               **kernel_options) -> torch.Tensor:
        """q [B, Hq, D] (rotated) over slots start[b]..slot of layer `index` -> [B, Hq, D], q.dtype."""
        layer = self._layers[index]
        if self.use_kernels:
            from kernels import kv_ops

            if not isinstance(slot, torch.Tensor):
                slot = torch.tensor(slot, device=q.device, dtype=torch.int64)
            if self._query_rotation is not None:  # R q . R k = q . k
                q = (q.float() @ self._query_rotation).to(q.dtype)
            return kv_ops.kv_decode_attention(q, layer, start, slot, **kernel_options)
        k, v = self._read_stored(index, int(slot) + 1)  # int4_centered: k - mu, same softmax
        return ref.attention(q, k, v, start).to(q.dtype)

    def read(self, index: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Slots [0, n) of layer `index` dequantized (reference rules), FP32 [B, H, n, D] each, in the
        model's basis (int4_hadamard: the stored keys rotated back; int4_centered: and mu added)."""
        k, v = self._read_stored(index, n)
        if self.key_mean is not None:
            k = k + self.key_mean[index][:, :, None, :]
        return k, v

    def _keep_sink(self, index: int, k: torch.Tensor, v: torch.Tensor, s0: int, start: torch.Tensor) -> None:
        """Copy the tokens of k, v [B, H, T, D] (slots s0..; keys as the quantizer sees them) at row
        positions p < sink into the sink."""
        positions = torch.arange(s0, s0 + k.shape[2], device=k.device)[None, :] - start[:, None]  # [B, T]
        for row, token in (positions.ge(0) & positions.lt(self.quant.sink)).nonzero().tolist():
            p = int(positions[row, token])
            self.sink_k[index, row, :, p] = k[row, :, token].to(torch.bfloat16)
            self.sink_v[index, row, :, p] = v[row, :, token].to(torch.bfloat16)

    def _with_sink(self, index: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v [B, H, n, D] read from codes, with each row's sink slots start[b] + p replaced by the
        BF16 copies (slots not yet written stay as read)."""
        n, start = k.shape[2], self._sink_start
        for p in range(min(self.quant.sink, n)):
            slots = start + p  # [B]
            rows = (slots < n).nonzero().flatten()
            k[rows, :, slots[rows]] = self.sink_k[index, rows, :, p].float()
            v[rows, :, slots[rows]] = self.sink_v[index, rows, :, p].float()
        return k, v

    def _read_stored(self, index: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Like `read`, but int4_centered's keys stay centered (k - mu): what attention reads."""
        layer, quant = self._layers[index], self.quant
        if quant.mode is KVCacheMode.KIVI:
            return ref.kivi_read(layer, n, quant)
        if not quant.quantized:
            return layer.k_codes[:, :, :n].float(), layer.v_codes[:, :, :n].float()
        k = ref.read_tokens((layer.k_codes, layer.k_scale, layer.k_zero), n, quant.key)
        v = ref.read_tokens((layer.v_codes, layer.v_scale, layer.v_zero), n, quant.value)
        if self._sink_start is not None:
            k, v = self._with_sink(index, k, v)
        if self.key_signs is not None:
            k = inverse_hadamard_transform(k, self.key_signs)
        return k, v


def _same_strides(k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The write kernels index k and v with one set of strides (last dim contiguous)."""
    if k.stride() == v.stride() and k.stride(-1) == 1:
        return k, v
    return k.contiguous(), v.contiguous()
