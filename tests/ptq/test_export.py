"""Export: compressed-tensors round trip (bit-exact, through the package's own decompressors) and
the quantized model folder round trip (same codes, same logits)."""

import copy
import json

import pytest
import torch

from fp8train.ptq.config import PtqConfig
from fp8train.ptq.export import compress_linear, ct_format, load_quantized, save_quantized
from fp8train.ptq.fused_groups import FusedGroupSplitWarning
from fp8train.ptq.pipeline import quantize_decoder
from fp8train.ptq.plan import LayerPlan, QuantPlan, uniform_plan
from fp8train.ptq.quantized_linear import QuantizedLinear
from fp8train.ptq.rtn import rtn_quantize
from fp8train.quant.spec import QuantSpec
from tests.ptq.helpers import TINY, batches, build_from_dict, tiny_model

SPECS = [QuantSpec("uint4", "tile", 32, False), QuantSpec("int4", "tile", 32, True), QuantSpec("int4", "row"),
         QuantSpec("uint8", "row", symmetric=False), QuantSpec("int8", "row"), QuantSpec("e4m3", "row"),
         QuantSpec("e4m3", "block", 32)]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe())
def test_compressed_tensors_round_trip_is_bit_exact(spec):
    from compressed_tensors.compressors.base import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme

    from fp8train.ptq.export import ct_args

    layer = QuantizedLinear.from_weight(rtn_quantize(torch.randn(64, 96), spec), spec)
    ours = layer.weight_quantized().dequantize()
    compressed = compress_linear(layer)
    scheme = QuantizationScheme(targets=["x"], weights=ct_args(spec), format=ct_format(spec))
    compressor = BaseCompressor.get_value_from_registry(ct_format(spec))
    theirs = compressor.decompress(dict(compressed), scheme)["weight"]
    assert theirs.dtype == torch.float32 and torch.equal(theirs, ours)
    # and their compressor, given our dequantized weight, scales and (signed, unpacked) zero points,
    # writes exactly our tensors
    given = {"weight": ours, "weight_scale": compressed["weight_scale"]}
    if layer.weight_zero_point is not None:
        given["weight_zero_point"] = (layer.weight_zero_point.to(torch.int16) - 2 ** (spec.bits - 1)).to(torch.int8)
    again = compressor.compress(given, scheme)
    assert set(again) == set(compressed)
    for key, value in again.items():
        assert torch.equal(_bits(value), _bits(compressed[key])), key


def _bits(t):
    return t.view(torch.uint8) if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) else t


def _quantized_tiny(plan=None, preset=None):
    model = tiny_model()
    config = PtqConfig.from_dict(preset or {"method": "gptq", "weight": {"format": "uint4", "granularity": "tile",
                                                                       "group_size": 32, "symmetric": False}})
    quantize_decoder(model, config, plan or uniform_plan(config.weight, config.input), batches())
    return model


def test_save_load_round_trip_mixed_precision(tmp_path):
    low = LayerPlan(QuantSpec("uint4", "tile", 32, False))
    plan = QuantPlan(low, {"layers.0.mlp.down_proj": LayerPlan(QuantSpec("int8", "row"), QuantSpec("int8", "row")),
                           "layers.1.attn.q_proj": LayerPlan(QuantSpec("e4m3", "row")), "layers.1.attn.k_proj": None})
    model = _quantized_tiny(plan)
    with pytest.warns(FusedGroupSplitWarning, match="layers.1.attn.q_proj"):  # q e4m3, k kept, v uint4
        folder = save_quantized(model, tmp_path / "q", {"model_config": TINY.__dict__ | {"moe": None}})
    config = json.loads((folder / "config.json").read_text())
    assert config["quantization_config"]["format"] == "mixed-precision"
    assert config["quantization_config"]["quantization_status"] == "compressed"
    loaded = load_quantized(folder, build_from_dict)
    assert isinstance(loaded.layers[1].attn.k_proj, torch.nn.Linear)
    for name, module in model.named_modules():
        if isinstance(module, QuantizedLinear):
            other = loaded.get_submodule(name)
            assert torch.equal(other.weight_codes.view(torch.uint8), module.weight_codes.view(torch.uint8))
    tokens = batches(1)[0]
    assert torch.equal(loaded(tokens), model(tokens))


def test_existing_export_path_is_refused(tmp_path):
    model = _quantized_tiny(preset={"method": "rtn", "weight": {"format": "int8", "granularity": "row"}})
    meta = {"model_config": TINY.__dict__ | {"moe": None}}
    save_quantized(model, tmp_path / "q", meta)
    with pytest.raises(ValueError, match="already exists.*overwrite"):
        save_quantized(model, tmp_path / "q", meta)
    save_quantized(model, tmp_path / "q", meta, overwrite=True)
    with pytest.raises(ValueError, match="not a quantized model folder"):
        load_quantized(tmp_path, build_from_dict)
