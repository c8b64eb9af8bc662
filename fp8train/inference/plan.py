"""DecodePlan: the decode step with fused GEMMs and kernels (about 9 launches per layer).

Per layer, with the residual stream r and normed input h carried between layers:

    qkv = h @ [Wq; Wk; Wv]^T                 one GEMM (dense cuBLAS or low-bit kernel)
    q   = cache.write_rotary(q, k, v)        RoPE + quantize + store, one kernel (+ KIVI flush)
    o   = cache.attend(q)                    split + reduce
    r, h = add_rmsnorm(r, o @ Wo^T)          one GEMM, one kernel
    gu  = h @ [Wgate; Wup]^T                 one GEMM
    r, h = add_rmsnorm(r, silu(g) * u @ Wdown^T, next norm)   SwiGLU fused into the down GEMM's load

Weights come from the model's modules (protocol.py) and are concatenated once (a copy: the plan
holds its own [q; k; v] and [gate; up] weights). A module is read as
  * dense: `module.weight` [out, in]  -> F.linear (cuBLAS)
  * quantized: `module.weight_quantized()` (fp8train.ptq's QuantizedLinear; its `input_spec` too)
    or `module.qweight` (QuantizedTensor or LowBitWeight) -> lowbit_linear
and `weight_spec` quantizes the dense weights on the fly (round to nearest; every GEMM of the model
in ONE batched launch on CUDA: the benchmark's W4/W8 models). `input_spec` (per-token int8 / e4m3) makes every GEMM W8A8.
Norm modules with `weight` and `eps` and no `bias` are RMSNorms (fused kernel on CUDA); anything
else is called as is, as are MoE FFNs. Off CUDA every op is its torch reference, so the plan runs
(and is tested) on a CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fp8train.inference.lowbit_matmul import (LowBitWeight, lowbit_linear, module_weight, prepare_weight,
                                              quantize_weights, uses_triton)
from fp8train.inference.protocol import DecoderParts
from fp8train.quant.spec import QuantSpec
from fp8train.quant.tensor import QuantizedTensor


@dataclass
class PlanLinear:
    """One GEMM: dense weight or low-bit weight (+ optional activation quantization)."""

    dense: torch.Tensor | None = None
    lowbit: LowBitWeight | None = None
    input_spec: QuantSpec | None = None
    backend: str = "auto"

    def __call__(self, x: torch.Tensor, swiglu: bool = False) -> torch.Tensor:
        if self.lowbit is not None:
            return lowbit_linear(x, self.lowbit, self.input_spec, swiglu=swiglu, backend=self.backend)
        if swiglu:
            gate, up = x.chunk(2, dim=-1)
            x = F.silu(gate) * up
        return F.linear(x, self.dense)

    @property
    def nbytes(self) -> int:
        return self.lowbit.nbytes if self.lowbit is not None else self.dense.numel() * self.dense.element_size()


@dataclass
class SplitLinear:
    """Projections that cannot share one GEMM (a mixed-precision plan gave them different formats or
    activation quantizers): one GEMM each, outputs concatenated as the fused GEMM would return them."""

    parts: list[PlanLinear]

    def __call__(self, x: torch.Tensor, swiglu: bool = False) -> torch.Tensor:
        assert not swiglu, "the SwiGLU input belongs to the down projection, which is never split"
        return torch.cat([part(x) for part in self.parts], dim=-1)

    @property
    def nbytes(self) -> int:
        return sum(part.nbytes for part in self.parts)


def _fusable(ws: list[LowBitWeight]) -> bool:
    first = ws[0]
    return all((w.fmt, w.granularity, w.k, w.zero is None) == (first.fmt, first.granularity, first.k, first.zero is None)
               for w in ws)


def _cat_quantized(parts: list[QuantizedTensor | LowBitWeight]) -> LowBitWeight:
    ws = [prepare_weight(p) for p in parts]
    first = ws[0]
    if not _fusable(ws):
        raise ValueError("fused projections need one quantization format, granularity and K")
    zero = None if first.zero is None else torch.cat([w.zero for w in ws])
    return LowBitWeight(torch.cat([w.codes for w in ws]), torch.cat([w.scale for w in ws]), zero, first.fmt,
                        first.granularity, sum(w.n for w in ws), first.k)


@dataclass
class _LayerPlan:
    qkv: PlanLinear
    o: PlanLinear
    gate_up: PlanLinear | None  # None: call the FFN module (MoE)
    down: PlanLinear | None


class DecodePlan:
    def __init__(self, parts: DecoderParts, weight_spec: QuantSpec | None = None, input_spec: QuantSpec | None = None,
                 backend: str = "auto"):
        self.parts, self.backend, self.input_spec = parts, backend, input_spec
        groups = []  # per layer: lists of module weights to fuse
        for layer in parts.layers:
            mlp = layer.mlp
            has_mlp = mlp is not None and all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj"))
            groups.append([[layer.q_proj, layer.k_proj, layer.v_proj], [layer.o_proj],
                           [mlp.gate_proj, mlp.up_proj] if has_mlp else None, [mlp.down_proj] if has_mlp else None])
        linears = [self._linear(g) if g is not None else None for layer_groups in groups for g in layer_groups]
        if weight_spec is not None:  # every dense GEMM of the model quantized in ONE batched launch
            flat = [part for lin in linears if lin is not None
                    for part in (lin.parts if isinstance(lin, SplitLinear) else [lin])]
            dense = [lin for lin in flat if lin.dense is not None]
            quantized = quantize_weights([lin.dense.float() for lin in dense], weight_spec, backend)
            for lin, lowbit in zip(dense, quantized):
                lin.dense, lin.lowbit, lin.input_spec = None, lowbit, input_spec
        self.layers = [_LayerPlan(*linears[i:i + 4]) for i in range(0, len(linears), 4)]

    def _linear(self, modules: list) -> PlanLinear | SplitLinear:
        """One GEMM for the modules (q/k/v, gate/up fused), or one each when they cannot share it."""
        weights = [module_weight(m) for m in modules]
        if all(isinstance(w, torch.Tensor) for w in weights):
            dense = torch.cat([w.detach() for w in weights]) if len(weights) > 1 else weights[0].detach()
            return PlanLinear(dense=dense, backend=self.backend)
        specs = {getattr(m, "input_spec", None) for m in modules}
        quantized = all(not isinstance(w, torch.Tensor) for w in weights)
        if len(modules) > 1 and (len(specs) > 1 or not quantized or not _fusable([prepare_weight(w) for w in weights])):
            return SplitLinear([self._linear([m]) for m in modules])
        spec = specs.pop() or self.input_spec
        return PlanLinear(lowbit=_cat_quantized(weights), input_spec=spec, backend=self.backend)

    @property
    def weight_bytes(self) -> int:
        return sum(lin.nbytes for lp in self.layers for lin in (lp.qkv, lp.o, lp.gate_up, lp.down) if lin is not None)

    def _fused(self, x: torch.Tensor) -> bool:
        return uses_triton(x, self.backend)

    def _add_norm(self, residual: torch.Tensor, delta: torch.Tensor | None, norm, fused: bool):
        """(residual + delta, norm(residual + delta)); in place on the fused path."""
        if fused and hasattr(norm, "weight") and hasattr(norm, "eps") and not hasattr(norm, "bias"):
            from kernels.decode_fused import add_rmsnorm

            return residual, add_rmsnorm(residual, delta, norm.weight, norm.eps)
        residual = residual if delta is None else residual + delta
        return residual, norm(residual)

    @torch.no_grad()
    def prefill(self, decoder, input_ids: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
        """The prompt through the plan's GEMMs (same weights as the steps) -> logits [B, T, V]."""
        from fp8train.inference.decoder import prefill_mask, prompt_attention
        from fp8train.inference.rope import rotate

        p, cache = self.parts, decoder.cache
        batch, tokens = input_ids.shape
        hq, hkv, hd = p.n_heads, p.n_kv_heads, p.head_dim
        idx = torch.arange(tokens, device=input_ids.device)
        positions = (idx[None, :] - start[:, None]).clamp(min=0)
        valid = (idx[None, :] >= start[:, None])[:, :, None, None]
        mask = prefill_mask(start, tokens) if bool((start > 0).any()) else None
        residual = p.embed(input_ids).reshape(batch * tokens, -1).contiguous()
        fused = self._fused(residual)
        residual, h = self._add_norm(residual, None, p.layers[0].attn_norm, fused)
        for i, (layer, lp) in enumerate(zip(p.layers, self.layers)):
            qkv = lp.qkv(h).view(batch, tokens, hq + 2 * hkv, hd)
            q = rotate(qkv[:, :, :hq], p.cos, p.sin, positions)
            k = rotate(qkv[:, :, hq:hq + hkv], p.cos, p.sin, positions) * valid
            v = qkv[:, :, hq + hkv:] * valid
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, heads, T, hd]
            cache.write(i, k, v, 0, start)
            out = prompt_attention(q, k, v, mask).transpose(1, 2).reshape(batch * tokens, hq * hd)
            residual, h = self._add_norm(residual, lp.o(out), layer.ffn_norm, fused)
            if lp.gate_up is not None:
                ffn = lp.down(lp.gate_up(h), swiglu=True)
            else:
                ffn = layer.ffn(h.view(batch, tokens, -1)).reshape(batch * tokens, -1)
            next_norm = p.layers[i + 1].attn_norm if i + 1 < len(p.layers) else p.norm
            residual, h = self._add_norm(residual, ffn.contiguous(), next_norm, fused)
        return p.lm_head(h).view(batch, tokens, -1)

    @torch.no_grad()
    def step(self, decoder, tokens: torch.Tensor, slot: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
        p, cache = self.parts, decoder.cache
        batch, hq, hkv, hd = tokens.shape[0], p.n_heads, p.n_kv_heads, p.head_dim
        residual = p.embed(tokens).contiguous()  # [B, d]
        fused = self._fused(residual)
        residual, h = self._add_norm(residual, None, p.layers[0].attn_norm, fused)
        for i, (layer, lp) in enumerate(zip(p.layers, self.layers)):
            qkv = lp.qkv(h)  # [B, (hq + 2 hkv) hd]
            q = qkv[:, :hq * hd].view(batch, hq, hd)
            k = qkv[:, hq * hd:(hq + hkv) * hd].view(batch, hkv, hd)
            v = qkv[:, (hq + hkv) * hd:].view(batch, hkv, hd)
            q = cache.write_rotary(i, q, k, v, slot, p.cos, p.sin, start)
            attn = lp.o(cache.attend(i, q, slot, start).reshape(batch, hq * hd))
            residual, h = self._add_norm(residual, attn, layer.ffn_norm, fused)
            if lp.gate_up is not None:
                ffn = lp.down(lp.gate_up(h), swiglu=True)
            else:
                ffn = layer.ffn(h[:, None])[:, 0]
            next_norm = p.layers[i + 1].attn_norm if i + 1 < len(p.layers) else p.norm
            residual, h = self._add_norm(residual, ffn.contiguous(), next_norm, fused)
        return p.lm_head(h)
