"""Quantization-aware training: fake quantization with a straight-through estimator.

    preset       QATPreset: per role (weight, input) a fp8train.quant.QuantSpec; conf/qat/*.yaml
    fake_quant   the STE fake quantizer (the core's reference fake_quantize forward, identity back)
    apply        apply_qat(model, preset): QATLinear for plain linears, the weight_transform slot of
                 FP8 layers; rtn_quantize_weights_: the RTN export with the same quantizer

The trainer applies a preset with `+qat=<name>` on top of any FP8 recipe (docs/QUALITY.md).
Imports torch and fp8train.quant only.
"""

from fp8train.qat.apply import QATLinear, QATReport, apply_qat, default_filter, rtn_quantize_weights_
from fp8train.qat.fake_quant import FakeQuantize, fake_quantize_ste
from fp8train.qat.preset import PRESETS_DIR, QATPreset, list_presets, load_preset, preset_from_dict

__all__ = ["PRESETS_DIR", "FakeQuantize", "QATLinear", "QATPreset", "QATReport", "apply_qat", "default_filter",
           "fake_quantize_ste", "list_presets", "load_preset", "preset_from_dict", "rtn_quantize_weights_"]
