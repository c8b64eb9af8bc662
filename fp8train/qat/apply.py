"""Put a QAT preset's fake quantizers into a model, and the matching RTN export for measuring.

    report = apply_qat(model, load_preset("w4_g128"))     # after convert_to_fp8, before training
    print(report)                                          # which layers, which quantizers

Which layers: every linear layer except the embedding, the LM head and an MoE router/gate (matched
on the module's own name), i.e. the layers the PTQ command quantizes (fp8train.ptq keeps embed,
norm, lm_head and the router in high precision). A custom `module_filter(fqn, module)` returns
True to train a layer with fake quantization, or False / a reason string to leave it alone.

How QAT meets the FP8 recipe (any recipe combines with any preset):

    plain nn.Linear (FP8 off, e.g. +recipe=bf16, or a layer the recipe skipped)
        -> QATLinear: y = linear(fq_in(x), fq_w(W)) in the working precision
    FP8 layer (FP8Linear: has a `weight_transform` slot)
        -> its weight_transform is fq_w: the layer casts fq_w(W) to FP8 (once per optimizer step,
           cached like any FP8 weight), so the FP8 GEMM runs on the QAT grid's values re-expressed
           in FP8; fq_in runs on the input before the layer's own FP8 input cast.

Both paths are straight-through (fake_quant.py): the gradient reaches the high-precision master
weight unchanged. An INT4 value times its group scale is generally not exact in FP8 (E4M3 has 3
mantissa bits), so under an FP8 recipe the forward sees fq_w(W) plus the FP8 rounding of it; the
export quantizes the trained master weight with fq_w's grid only. MoE experts (grouped linears)
and Transformer Engine layers have no slot and are reported as skipped.

`rtn_quantize_weights_(model, preset)` replaces every targeted weight by its fake-quantized value
in place: the RTN export of the PTQ command with the same QuantSpec (used to measure what QAT buys).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from fp8train.qat.fake_quant import FakeQuantize
from fp8train.qat.preset import QATPreset
from fp8train.quant.spec import QuantSpec

HIGH_PRECISION_NAMES = ("embed", "embedding", "lm_head", "output", "router", "gate")
ModuleFilter = Callable[[str, nn.Module], "bool | str"]


@dataclass
class QATReport:
    preset: str
    trained: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"QAT preset {self.preset!r}: fake-quantized {len(self.trained)} layer(s), "
                 f"skipped {len(self.skipped)}"]
        return "\n".join(lines + [f"  skip {name}: {why}" for name, why in self.skipped])


def default_filter(fqn: str, module: nn.Module) -> bool | str:
    leaf = fqn.rsplit(".", 1)[-1]
    if leaf in HIGH_PRECISION_NAMES:
        return f"'{leaf}' stays in high precision (embedding / LM head / router, as in the PTQ export)"
    return True


class QATLinear(nn.Linear):
    """nn.Linear whose forward uses the fake-quantized weight (and input), STE backward."""

    weight_fake_quant: FakeQuantize | None
    input_fake_quant: FakeQuantize | None

    @classmethod
    def from_linear(cls, linear: nn.Linear, preset: QATPreset) -> "QATLinear":
        """Keep the Parameter objects (an optimizer built before the swap stays valid)."""
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        layer.weight, layer.bias = linear.weight, linear.bias
        layer.weight_fake_quant = None if preset.weight is None else FakeQuantize(preset.weight, "weight")
        layer.input_fake_quant = None if preset.input is None else FakeQuantize(preset.input, "input")
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_fake_quant is not None:
            x = self.input_fake_quant(x)
        weight = self.weight if self.weight_fake_quant is None else self.weight_fake_quant(self.weight)
        return F.linear(x, weight, self.bias)


def _input_hook(module: nn.Module, args: tuple) -> tuple:
    return (module.input_fake_quant(args[0]), *args[1:])


def _check_shape(fqn: str, module: nn.Module, preset: QATPreset) -> None:
    if preset.weight is not None:
        preset.weight.grid.check_shape(module.out_features, module.in_features, f"{fqn}.weight")
    if preset.input is not None:
        preset.input.grid.check_shape(1, module.in_features, f"{fqn} input")


def _attach(fqn: str, module: nn.Module, preset: QATPreset, model: nn.Module) -> str | None:
    """Fake-quantize one layer; returns None, or why it cannot be."""
    if type(module) is nn.Linear:
        parent, _, leaf = fqn.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, QATLinear.from_linear(module, preset))
        return None
    if isinstance(module, nn.Linear) and hasattr(module, "weight_transform"):  # an FP8 layer's slot
        if preset.weight is not None:
            module.weight_transform = FakeQuantize(preset.weight, "weight")
        if preset.input is not None:
            module.input_fake_quant = FakeQuantize(preset.input, "input")
            module.register_forward_pre_hook(_input_hook)
        invalidate = getattr(module, "invalidate_weight_cache", None)
        if invalidate is not None:
            invalidate()
        return None
    return f"{type(module).__name__} has no fake-quantization slot (grouped MoE experts, TE layers)"


def _targets(model: nn.Module, module_filter: ModuleFilter | None) -> tuple[list, list]:
    """(linear layers to fake-quantize, [(name, why not)]): every nn.Linear (FP8Linear included)
    the filter accepts, and stacked-expert weights [E, N, K] (MoE), which are reported."""
    module_filter = module_filter or default_filter
    chosen, skipped = [], []
    for fqn, module in model.named_modules():
        weight = getattr(module, "weight", None)
        grouped = isinstance(weight, torch.Tensor) and weight.dim() == 3
        if not fqn or not (isinstance(module, nn.Linear) or grouped):
            continue
        verdict = module_filter(fqn, module)
        if verdict is True:
            chosen.append((fqn, module))
        else:
            skipped.append((fqn, verdict if isinstance(verdict, str) else "excluded by module_filter"))
    return chosen, skipped


def apply_qat(model: nn.Module, preset: QATPreset, module_filter: ModuleFilter | None = None) -> QATReport:
    """Fake-quantize every targeted linear in place (see the module docstring); ValueError before
    any change if a layer's shape does not split into the preset's groups."""
    report = QATReport(preset.name)
    chosen, report.skipped = _targets(model, module_filter)
    for fqn, module in chosen:
        if isinstance(module, nn.Linear):
            _check_shape(fqn, module, preset)
    for fqn, module in chosen:
        why = _attach(fqn, module, preset, model)
        if why is None:
            report.trained.append(fqn)
        else:
            report.skipped.append((fqn, why))
    return report


@torch.no_grad()
def rtn_quantize_weights_(model: nn.Module, spec: QuantSpec, module_filter: ModuleFilter | None = None) -> list[str]:
    """Replace every targeted linear weight W by spec's fake_quantize(W), in place (RTN export)."""
    chosen, _ = _targets(model, module_filter)
    done = []
    for fqn, module in chosen:
        if isinstance(module, nn.Linear):
            spec.grid.check_shape(module.out_features, module.in_features, f"{fqn}.weight")
            module.weight.copy_(spec.fake_quantize(module.weight))
            getattr(module, "invalidate_weight_cache", lambda: None)()
            done.append(fqn)
    return done
