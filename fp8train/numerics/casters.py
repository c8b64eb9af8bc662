"""Role casters: turn one high-precision operand into the FP8 operands its GEMMs need.

Each operand of a linear layer feeds two GEMMs with different contraction dimensions:

    input X [M, K]         output GEMM contracts K      grad_weight GEMM contracts M (tokens)
    weight W [N, K]        output GEMM contracts K      grad_input GEMM contracts N
    grad_output dY [M, N]  grad_input GEMM contracts N  grad_weight GEMM contracts M (tokens)

so a caster returns `rows` (contraction along the last dim, as stored) and, when asked, `cols`
(contraction along the first dim: the quantized transpose). Tensorwise and 128x128-block scaling
reuse the same FP8 values for both (a transposed copy of 1-byte data); rowwise and 1x128-tile
scaling quantize the transpose separately, because its groups run the other way (DeepSeek-V3's
128x1 tiles for the token-major wgrad operands).

A `delayed` caster owns the persistent FP32 buffers of Transformer Engine's DelayedScaling:
amax_history [H], scale [1], scale_inv [1]. Its cast uses `scale` and records this cast's amax into
amax_history[0] (max-accumulated across gradient-accumulation micro-batches; on CUDA the cast
kernel itself does it, one launch per cast).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fp8train.numerics import fast_paths
from fp8train.numerics.quantize import FP8Tensor, quantize_blocks, quantize_rowwise, quantize_tensorwise
from fp8train.numerics.recipe import RoleConfig
from fp8train.numerics.scaling import scale_from_amax, tensor_amax


class RoleCaster(nn.Module):
    """Casts one operand role (input, weight or grad_output) as its RoleConfig says."""

    def __init__(self, role: str, config: RoleConfig):
        super().__init__()
        self.role, self.config, self.fmt = role, config, config.fp8
        self.collect_telemetry = False
        self.last_stats: dict[str, float] = {}
        if config.scaling == "delayed":
            self.register_buffer("amax_history", torch.zeros(config.history_len, dtype=torch.float32))
            self.register_buffer("scale", torch.ones(1, dtype=torch.float32))
            self.register_buffer("scale_inv", torch.ones(1, dtype=torch.float32))
            self.register_buffer("fp8_max", torch.full((1,), self.fmt.max), persistent=False)

    def extra_repr(self) -> str:
        c = self.config
        extra = f", history={c.history_len}, algo={c.amax_compute_algo}" if c.scaling == "delayed" else ""
        return f"role={self.role}, format={c.format}, scaling={c.scaling}{extra}"

    def cast(self, x: torch.Tensor, need_cols: bool) -> tuple[FP8Tensor, FP8Tensor | None]:
        """x [R, C] high precision -> (rows, cols or None)."""
        scaling = self.config.scaling
        if scaling in ("delayed", "current"):
            rows, cols = self._cast_tensorwise(x, need_cols)
        elif scaling == "rowwise":
            rows = quantize_rowwise(x, self.fmt, self.config.power_of_2)
            cols = quantize_rowwise(x.t(), self.fmt, self.config.power_of_2) if need_cols else None
        else:
            rows, cols = self._cast_blockwise(x, need_cols)
        if self.collect_telemetry:
            self.last_stats = _cast_stats(x, rows)
        return rows, cols

    def cast_cols(self, x: torch.Tensor) -> FP8Tensor:
        """Only the quantized transpose of x [R, C] (contraction along R), no amax recorded.

        Used by the grouped (MoE) GEMMs, whose token-major operands are quantized per expert group.
        Tensorwise casters reuse their current scale (delayed) or the group's own amax (current).
        """
        cfg = self.config
        if cfg.scaling == "delayed":
            return quantize_tensorwise(x.t(), self.fmt, self.scale)
        if cfg.scaling == "current":
            scale = scale_from_amax(tensor_amax(x, cfg.amax_percentile), self.fmt.max, cfg.power_of_2)
            return quantize_tensorwise(x.t(), self.fmt, scale)
        if cfg.scaling == "rowwise":
            return quantize_rowwise(x.t(), self.fmt, cfg.power_of_2)
        if self.role == "weight":
            return quantize_blocks(x.t(), self.fmt, cfg.power_of_2)
        return fast_paths.quantize_tiles_t(x, self.fmt, cfg.power_of_2)

    def _cast_blockwise(self, x: torch.Tensor, need_cols: bool):
        """128x128 blocks for the weight, 1x128 tiles for activations and gradients; with need_cols
        one kernel writes both operands (the weight's transposed copy; the 128x1 tiles of x)."""
        power_of_2 = self.config.power_of_2
        if self.role == "weight":
            if need_cols:
                return fast_paths.quantize_blocks_both(x, self.fmt, power_of_2)
            return fast_paths.quantize_blocks(x, self.fmt, power_of_2), None
        if need_cols:
            return fast_paths.quantize_tiles_both(x, self.fmt, power_of_2)
        return fast_paths.quantize_tiles(x, self.fmt, power_of_2), None

    def _cast_tensorwise(self, x: torch.Tensor, need_cols: bool):
        percentile = self.config.amax_percentile
        if self.config.scaling == "delayed":
            # Evaluation activations must not steer the training scales. The weight is recorded
            # always: its FP8 copy is cached across eval and the next training step, so its one
            # cast per step must count whichever mode it happened in.
            slot = self.amax_history[0:1] if self.training or self.role == "weight" else None
            if percentile is None:
                return fast_paths.delayed_cast(x, self.scale, slot, self.fmt, need_cols)
            rows = quantize_tensorwise(x, self.fmt, self.scale)
            if slot is not None:
                fast_paths.record_amax(slot, tensor_amax(x, percentile))
            return rows, (rows.t() if need_cols else None)
        if percentile is None:
            return fast_paths.current_cast(x, self.fmt, self.config.power_of_2, need_cols)
        amax = tensor_amax(x, percentile)
        scale = scale_from_amax(amax, self.fmt.max, self.config.power_of_2)
        rows = quantize_tensorwise(x, self.fmt, scale)
        return rows, (rows.t() if need_cols else None)


@torch.no_grad()
def _cast_stats(x: torch.Tensor, q: FP8Tensor) -> dict[str, float]:
    """amax, scale, fraction saturated (clipped by the cast), fraction flushed to zero, and the
    cast's SQNR in dB, 20 log10(||x|| / ||x - dequantize(q)||) (inf when the cast is exact).

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
        "amax": float(x32.abs().amax()),
        "scale": float((1.0 / q.scale_inv.float()).mean()),
        "saturated": float((scaled.abs() > clip_bound).float().mean()),
        "underflow": float(flushed.float().sum() / nonzero.sum().clamp(min=1)),
        "sqnr_db": _sqnr_db(x32, q.dequantize()),
    }


def _sqnr_db(x: torch.Tensor, approx: torch.Tensor) -> float:
    signal, noise = x.double().norm(), (x.double() - approx.double()).norm()
    return float(20.0 * torch.log10(signal / noise)) if noise > 0 else math.inf
