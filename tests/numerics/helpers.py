"""Shared references for the numerics tests: float32 rounding in pure Python, SQNR, and a
pure-Python (lists + math) model of the DelayedScaling update (Transformer Engine's rule, with
non-finite amaxes skipped as its CUDA kernel does: see fp8train.quant.scaling)."""

from __future__ import annotations

import math
import struct

import torch

from fp8train.numerics import Recipe, recipe_from_dict

FLT_MAX = struct.unpack("f", struct.pack("I", 0x7F7FFFFF))[0]


def f32(value: float) -> float:
    """Round a Python float to the nearest float32 (inf on overflow, like an FP32 operation)."""
    try:
        return struct.unpack("f", struct.pack("f", value))[0]
    except OverflowError:
        return math.copysign(math.inf, value)


def nan_max(a: float, b: float) -> float:
    """max that propagates NaN, like torch.maximum."""
    return math.nan if math.isnan(a) or math.isnan(b) else max(a, b)


def assert_exact(actual: torch.Tensor, expected) -> None:
    """Bit-for-bit equality with FP32 values (NaN matches NaN)."""
    expected = torch.as_tensor(expected, dtype=torch.float32).reshape(actual.shape)
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True)


def sqnr(ref: torch.Tensor, test: torch.Tensor) -> float:
    """20 log10(||ref|| / ||ref - test||) in dB, computed in float64."""
    ref, test = ref.double(), test.double()
    return 20 * math.log10(ref.norm().item() / (ref - test).norm().item())


def ref_current_scale(amax: float, fp8_max: float, power_of_2: bool = False) -> float:
    """Current-scaling rule on Python floats: fp8_max / amax as ONE correctly rounded FP32 division
    (the float64 quotient rounded once), 1 for a zero/inf/NaN amax, FLT_MAX for an infinite scale."""
    scale = 1.0
    if math.isfinite(amax) and amax > 0:
        scale = f32(fp8_max / amax)
        scale = FLT_MAX if math.isinf(scale) else scale
    if power_of_2:
        scale = math.ldexp(1.0, math.frexp(scale)[1] - 1)
    return scale


class DelayedScalingRef:
    """One tensor's DelayedScaling state: history (slot 0 = this step), scale, scale_inv.

    Arithmetic mirrors FP32 tensors: every division is rounded to float32."""

    def __init__(self, fp8_max: float, history_len: int, algo: str, margin: float):
        self.fp8_max, self.algo, self.margin = fp8_max, algo, margin
        self.history = [0.0] * history_len
        self.scale, self.scale_inv = 1.0, 1.0

    def record(self, amax: float) -> None:
        self.history[0] = nan_max(self.history[0], amax)

    def update(self) -> None:
        if self.algo == "max":
            amax = max([h for h in self.history if math.isfinite(h)], default=0.0)
        else:
            amax = self.history[0]
        if math.isfinite(amax) and amax > 0:
            self.scale = f32(f32(self.fp8_max / amax) / f32(2.0 ** self.margin))
        self.scale = FLT_MAX if math.isinf(self.scale) else self.scale  # computed or stored
        self.scale_inv = f32(1.0 / self.scale)
        self.history = self.history[1:] + self.history[:1]  # torch.roll(history, -1)
        self.history[0] = 0.0


def make_recipe(name: str = "test", **roles) -> Recipe:
    """A validated recipe from per-role dicts (missing roles fall back to the Recipe defaults)."""
    return recipe_from_dict({"name": name, "backend": "emulated", **roles})


def delayed_role(fmt: str = "e4m3", history_len: int = 4, algo: str = "max", margin: float = 0.0) -> dict:
    return {"format": fmt, "scaling": "delayed", "history_len": history_len,
            "amax_compute_algo": algo, "margin": margin}


def grouped_fwd_bwd(layer, x, dy, sizes):
    """(output, grad_input, grad_weight) of one forward/backward of a grouped (MoE) layer."""
    x = x.clone().requires_grad_()
    y = layer(x, torch.tensor(sizes))
    y.backward(dy)
    grad_w, layer.weight.grad = layer.weight.grad, None
    return y.detach(), x.grad, grad_w
