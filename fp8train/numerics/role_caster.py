"""Role casters: turn one high-precision operand into the FP8 operands its GEMMs need.

Each operand of a linear layer feeds two GEMMs with different contraction dimensions:

    input X [M, K]         output GEMM contracts K      grad_weight GEMM contracts M (tokens)
    weight W [N, K]        output GEMM contracts K      grad_input GEMM contracts N
    grad_output dY [M, N]  grad_input GEMM contracts N  grad_weight GEMM contracts M (tokens)

so a caster returns `rows` (contraction along the last dim, as stored) and, when asked, `cols`
(contraction along the first dim: the quantized transpose). How is the core's table
(fp8train/quant/schemes.py): tensorwise and 128x128-block scaling reuse the same FP8 values for
both (a transposed copy of 1-byte data); rowwise and 1x128-tile scaling quantize the transpose
separately, because its groups run the other way (DeepSeek-V3's 128x1 tiles for the token-major
wgrad operands). The casts themselves are the core's (fp8train/quant/casts.py).

A `delayed` caster owns the persistent FP32 buffers of Transformer Engine's DelayedScaling:
amax_history [H], scale [1], scale_inv [1]. Its cast uses `scale` and records this cast's amax into
amax_history[0] (max-accumulated across gradient-accumulation micro-batches; on CUDA the cast
kernel itself does it, one launch per cast). While `warm_start` is set (fp8train.numerics.warm_start:
one pass before a fresh run's first step) a delayed caster encodes with this tensor's own scale,
as current scaling does, and still records the amax.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fp8train.numerics.recipe import RoleConfig
from fp8train.quant import casts
from fp8train.quant.scaling import ScalingMode, scale_from_amax, tensor_amax
from fp8train.quant.tensor import QuantizedTensor


class RoleCaster(nn.Module):
    """Casts one operand role (input, weight or grad_output) as its RoleConfig says."""

    def __init__(self, role: str, config: RoleConfig):
        super().__init__()
        self.role, self.config, self.fmt = role, config, config.fp8
        self.scheme = config.scheme(role)
        self.delayed = self.scheme.mode is ScalingMode.DELAYED
        self.collect_telemetry = False
        self.warm_start = False  # delayed: encode with the tensor's own scale (warm_start.py)
        self.last_stats: dict[str, torch.Tensor] = {}  # 0-d device tensors, read by fp8_telemetry
        casts.kernel_status()  # import the kernels now, never while torch.compile traces a cast
        if self.delayed:
            self.register_buffer("amax_history", torch.zeros(config.history_len, dtype=torch.float32))
            self.register_buffer("scale", torch.ones(1, dtype=torch.float32))
            self.register_buffer("scale_inv", torch.ones(1, dtype=torch.float32))
            self.register_buffer("fp8_max", torch.full((1,), self.fmt.max), persistent=False)

    def extra_repr(self) -> str:
        c = self.config
        extra = f", history={c.history_len}, algo={c.amax_compute_algo}" if self.delayed else ""
        return f"role={self.role}, format={c.format}, scaling={c.scaling}{extra}"

    def cast(self, x: torch.Tensor, need_cols: bool) -> tuple[QuantizedTensor, QuantizedTensor | None]:
        """x [R, C] high precision -> (rows, cols or None)."""
        cfg = self.config
        rows, cols = casts.cast(x, self.fmt, self.scheme, need_cols=need_cols, power_of_2=cfg.power_of_2,
                                scale=self._encode_scale(x), amax_slot=self._amax_slot(),
                                amax_percentile=cfg.amax_percentile, scale_inv=self._decode_scale(), role=self.role)
        if self.collect_telemetry:
            self.last_stats = _cast_stats(x, rows)
        return rows, cols

    def recast(self, x: torch.Tensor, need_cols: bool) -> tuple[QuantizedTensor, QuantizedTensor | None]:
        """The same cast again, recording nothing: re-derives an operand already cast this step
        (the weight in a compiled backward) bit for bit, as long as the scale has not moved."""
        cfg = self.config
        return casts.cast(x, self.fmt, self.scheme, need_cols=need_cols, power_of_2=cfg.power_of_2,
                          scale=self._encode_scale(x), amax_slot=None,
                          amax_percentile=cfg.amax_percentile, scale_inv=self._decode_scale(), role=self.role)

    def follow(self, leader: "RoleCaster") -> None:
        """Record what `leader` just recorded, for a caster whose operand the leader cast for it.

        Layers reading one input (q/k/v, gate/up) share one cast of it (FP8Linear.shared_input);
        the followers' delayed histories must still see that input's amax, so state, checkpoints
        and telemetry stay what separate casts would give: history[0] = max(own, leader's), which
        equals the separate cast's record because the members' histories see the same inputs."""
        slot, leader_slot = self._amax_slot(), leader._amax_slot()
        if slot is not None and leader_slot is not None:
            with torch.no_grad():
                slot.copy_(torch.maximum(slot, leader_slot))
        if self.collect_telemetry:
            self.last_stats = leader.last_stats

    def cast_cols(self, x: torch.Tensor) -> QuantizedTensor:
        """Only the quantized transpose of x [R, C] (contraction along R), no amax recorded.

        Used by the grouped (MoE) GEMMs, whose token-major operands are quantized per expert group.
        Tensorwise casters reuse their current scale (delayed) or the group's own amax (current).
        """
        cfg = self.config
        return casts.cast_cols(x, self.fmt, self.scheme, power_of_2=cfg.power_of_2,
                               scale=self._encode_scale(x), amax_percentile=cfg.amax_percentile)

    def _encode_scale(self, x: torch.Tensor) -> torch.Tensor | None:
        """A delayed cast's scale: the one its history gave, or in a warm-start pass x's own
        (current scaling: the pass's GEMMs, and the gradients they pass on, are well scaled)."""
        if not self.delayed:
            return None
        if not self.warm_start:
            return self.scale
        cfg = self.config
        return scale_from_amax(tensor_amax(x, cfg.amax_percentile), self.fmt.max, cfg.power_of_2).reshape(1)

    def _decode_scale(self) -> torch.Tensor | None:
        """The delayed scale's 1 / scale as the bank keeps it (the same correctly rounded division,
        kept in step by every scale update), or None where the encode scale is not the bank's."""
        return self.scale_inv if self.delayed and not self.warm_start else None

    def _amax_slot(self) -> torch.Tensor | None:
        """Where a delayed cast records its amax: history[0:1], or None.

        Evaluation activations must not steer the training scales. The weight is recorded always:
        its FP8 copy is cached across eval and the next training step, so its one cast per step
        must count whichever mode it happened in."""
        if not self.delayed or not (self.training or self.role == "weight"):
            return None
        return self.amax_history[0:1]

@torch.no_grad()
def _cast_stats(x: torch.Tensor, q: QuantizedTensor) -> dict[str, torch.Tensor]:
    """amax, scale, fraction saturated (clipped by the cast), fraction flushed to zero, and the
    cast's SQNR in dB, 20 log10(||x|| / ||x - dequantize(q)||) (inf when the cast is exact).

    0-d FP32 tensors on x's device: no host synchronisation here (and nothing torch.compile would
    have to break its graph for, as `float(tensor)` does); `fp8_telemetry` copies them to the host
    once for the whole model.

    With online scaling the largest element of every group lands on max (give or take FP32
    rounding), and anything below max + half an ulp rounds to max anyway: only values beyond that
    were really clipped, so that is the bound (448 + 16 for E4M3, 57344 + 4096 for E5M2).
    """
    x32 = x.detach().float()
    scaled = x32 / q.expanded_scale_inv()
    clip_bound = q.fmt.max + 2.0 ** (math.frexp(q.fmt.max)[1] - 2 - q.fmt.mantissa_bits)
    nonzero = x32 != 0
    flushed = nonzero & (q.data.float() == 0)
    return {
        "amax": x32.abs().amax(),
        "scale": (1.0 / q.scale_inv.float()).mean(),
        "saturated": (scaled.abs() > clip_bound).float().mean(),
        "underflow": flushed.float().sum() / nonzero.sum().clamp(min=1),
        "sqnr_db": _sqnr_db(x32, q.dequantize()),
    }


def _sqnr_db(x: torch.Tensor, approx: torch.Tensor) -> torch.Tensor:
    """20 log10(||x|| / ||x - approx||) as a 0-d FP32 tensor (inf when exact), computed in FP64."""
    signal, noise = x.double().norm(), (x.double() - approx.double()).norm()
    db = 20.0 * torch.log10(signal / noise)
    return torch.where(noise > 0, db, torch.full_like(db, math.inf)).float()
