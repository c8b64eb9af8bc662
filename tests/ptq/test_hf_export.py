"""The exported folder is an HF Llama: transformers loads it and computes our logits.

1. The name map, the RoPE convention and the config fields: transformers' LlamaForCausalLM, built
   from hf_layout.llama_config and given our state dict under hf_layout's names, computes our FP32
   logits (non-default rope_theta / norm_eps / GQA / tied embeddings, so each field matters); a
   wrong RoPE row order or swapped gate/up breaks it.
2. Folders written by save_quantized for real presets load with AutoModelForCausalLM.from_pretrained
   and reproduce our quantized model's logits. Tolerance 1e-5 (logits are O(1)): both sides decode
   exactly the same weights (the compressed-tensors round trip is bit-exact, test_export.py), so
   what is left is FP32 summation order (~1e-7 observed); one INT4 step is ~1e-2 of a weight.
3. What is not an HF Llama (MoE, fp8train-only outlier channels) keeps fp8train's names, says why
   in config.json, is refused by transformers, and still loads in fp8train.
"""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import transformers
import yaml

from fp8train.models import ModelConfig, Transformer
from fp8train.models.moe import MoEConfig
from fp8train.ptq.config import PtqConfig
from fp8train.ptq.export import load_quantized, save_quantized
from fp8train.ptq.fused_groups import FusedGroupSplitWarning
from fp8train.ptq.hf_layout import from_hf_name, llama_config, to_hf_name
from fp8train.ptq.pipeline import quantize_decoder
from fp8train.ptq.plan import LayerPlan, QuantPlan, uniform_plan
from fp8train.ptq.quantized_linear import QuantizedLinear
from fp8train.quant.spec import QuantSpec
from fp8train.train.quantize_run import build_from_config
from tests.ptq.helpers import batches, tiny_model

# K = 128 and 256: g128 fits; GQA; rope_theta and norm_eps away from both libraries' defaults
WIDE = ModelConfig(vocab_size=97, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=256,
                   max_seq_len=32, rope_theta=500.0, norm_eps=1e-3)
PRESETS = Path(__file__).resolve().parents[2] / "conf" / "quant"
TOLERANCE = 1e-5


def _hf_model(config: ModelConfig, state: dict):
    hf_config = transformers.LlamaConfig(**llama_config(dataclasses.asdict(config), torch.float32))
    model = transformers.LlamaForCausalLM(hf_config).eval()
    model.load_state_dict({to_hf_name(k): v for k, v in state.items()}, strict=True)
    return model


def _max_diff(ours, theirs, tokens) -> float:
    with torch.no_grad():
        return (ours(tokens) - theirs(tokens).logits).abs().max().item()


@pytest.mark.parametrize("tied", [False, True])
def test_name_map_rope_and_config_reproduce_our_logits(tied):
    config = dataclasses.replace(WIDE, tie_embeddings=tied)
    ours, tokens = tiny_model(config), batches(1, seq_len=32)[0]
    state = ours.state_dict()
    assert _max_diff(ours, _hf_model(config, state), tokens) < TOLERANCE
    # the check can fail: GGUF's adjacent-pair RoPE row order, swapped gate/up, HF's default eps
    half = config.head_dim // 2
    adjacent = torch.arange(config.head_dim).reshape(2, half).t().reshape(-1)
    perm = torch.cat([h * config.head_dim + adjacent for h in range(config.n_heads)])
    wrong_rope = {**state, "layers.0.attn.q_proj.weight": state["layers.0.attn.q_proj.weight"][perm]}
    swapped = {**state, "layers.1.mlp.gate_proj.weight": state["layers.1.mlp.up_proj.weight"],
               "layers.1.mlp.up_proj.weight": state["layers.1.mlp.gate_proj.weight"]}
    for broken in (wrong_rope, swapped):
        assert _max_diff(ours, _hf_model(config, broken), tokens) > 100 * TOLERANCE
    eps_default = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **{**llama_config(dataclasses.asdict(config), torch.float32), "rms_norm_eps": 1e-6})).eval()
    eps_default.load_state_dict({to_hf_name(k): v for k, v in state.items()})
    assert _max_diff(ours, eps_default, tokens) > 100 * TOLERANCE


def test_names_map_back():
    names = list(tiny_model(WIDE).state_dict())
    assert [from_hf_name(to_hf_name(n)) for n in names] == names
    assert to_hf_name("layers.3.attn_norm.weight") == "model.layers.3.input_layernorm.weight"
    with pytest.raises(ValueError, match="dense models only"):
        to_hf_name("layers.1.moe.router.weight")


def _preset(name_or_dict) -> PtqConfig:
    if isinstance(name_or_dict, str):
        return PtqConfig.from_dict(yaml.safe_load((PRESETS / f"{name_or_dict}.yaml").read_text()))
    return PtqConfig.from_dict(name_or_dict)


def _export(tmp_path, preset, config: ModelConfig = WIDE):
    model = tiny_model(config)
    quantize_decoder(model, preset, uniform_plan(preset.weight, preset.input), batches(1), progress=False)
    folder = save_quantized(model, tmp_path / preset.name, {"model_config": dataclasses.asdict(config),
                                                            "preset": preset.to_dict()})
    return model, folder


FP8_WEIGHT_ONLY = {"name": "fp8_weight_only", "method": "rtn", "weight": {"format": "e4m3", "granularity": "row"}}


@pytest.mark.parametrize("preset", ["rtn_w4_g128", "rtn_w4_g128_sym", "rtn_w8", "gptq_w8", "awq_w4_g128",
                                    FP8_WEIGHT_ONLY], ids=lambda p: p if isinstance(p, str) else p["name"])
def test_transformers_loads_the_export_and_matches_our_quantized_model(tmp_path, preset):
    preset = _preset(preset)
    ours, folder = _export(tmp_path, preset)
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["fp8train"]["layout"] == "hf_llama"
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokens = batches(1, seq_len=32)[0]
    assert _max_diff(ours, theirs, tokens) < TOLERANCE
    # and the quantization is really there: the float model differs by far more
    assert _max_diff(tiny_model(WIDE), theirs, tokens) > 100 * TOLERANCE
    again = load_quantized(folder, build_from_config)  # our loader maps the HF names back
    assert torch.equal(again(tokens), ours(tokens))


def _ct_int8_fake_quant_kernel(layer: QuantizedLinear, x: torch.Tensor) -> torch.Tensor:
    """INT8 W8A8 as compressed-tensors' forward computes it: x fake-quantized, times the dequantized
    W. Its symmetric INT8 grid: step = absmax / 127.5 (q range -128..127, 255 steps, halved) when
    dynamic, the stored input_scale when static; codes round(x / step) clamped to [-128, 127]."""
    x2d = x.reshape(-1, x.shape[-1]).float()
    if layer.input_scale_inv is not None:
        step = layer.input_scale_inv.float()
    else:
        step = x2d.abs().amax(dim=1, keepdim=True) / 127.5
    xq = torch.clamp(torch.round(x2d / step), -128, 127) * step
    y = xq @ layer.dequantized_weight().t()
    return y.to(x.dtype).reshape(*x.shape[:-1], layer.out_features)


@pytest.mark.parametrize("preset", ["w8a8_int8", "smoothquant_w8a8_static"])
def test_int8_w8a8_differs_only_by_compressed_tensors_activation_grid(tmp_path, monkeypatch, preset):
    """INT8 W8A8 folders load; transformers fake-quantizes activations on compressed-tensors' grid,
    which differs from ours (dynamic: absmax / 127.5 vs our absmax / 127, the step vLLM's int8
    kernels use; static: codes clamped to -128 vs our -127). With that grid emulated on our side the
    logits agree to 1e-5, so weights, scales and targets are right."""
    ours, folder = _export(tmp_path, _preset(preset))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokens = batches(1, seq_len=32)[0]
    print(f"{preset}: max |logit difference| on our own activation grid {_max_diff(ours, theirs, tokens):.2e}")
    assert _max_diff(ours, theirs, tokens) < 2e-2  # activation rounding only (logits are O(1))
    monkeypatch.setattr(QuantizedLinear, "kernel", staticmethod(_ct_int8_fake_quant_kernel))
    assert _max_diff(ours, theirs, tokens) < TOLERANCE


# DeepSeek-V3's recipe (E4M3 weight blocks, 1xG activation tiles) with 64 instead of 128: k_proj has N = 64 here
FP8_BLOCKWISE_64 = {"name": "fp8_blockwise_64", "method": "rtn",
                    "weight": {"format": "e4m3", "granularity": "block", "group_size": 64},
                    "input": {"format": "e4m3", "granularity": "tile", "group_size": 64, "dynamic": True}}


@pytest.mark.parametrize("preset", ["fp8_w8a8", FP8_BLOCKWISE_64], ids=lambda p: p if isinstance(p, str) else p["name"])
def test_fp8_w8a8_matches_up_to_the_last_bit_of_the_activation_scale(tmp_path, preset):
    """FP8 W8A8 (E4M3 weights, dynamic E4M3 activations per token or per 1xG tile): both sides take
    the step absmax / 448; we encode with x * (448 / absmax), compressed-tensors with
    x / (absmax / 448): one FP32 rounding apart, which can flip an E4M3 code that sits on a
    rounding boundary (3e-5 here)."""
    ours, folder = _export(tmp_path, _preset(preset))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokens = batches(1, seq_len=32)[0]
    assert _max_diff(ours, theirs, tokens) < 1e-4
    dense = transformers.AutoModelForCausalLM.from_pretrained(  # dequantize=True drops activation quantization
        folder, dtype=torch.float32, quantization_config=transformers.CompressedTensorsConfig(dequantize=True))
    assert _max_diff(ours, dense.eval(), tokens) > 1e-3


def test_not_llama_keeps_fp8train_names_and_transformers_refuses_it(tmp_path):
    moe = dataclasses.replace(WIDE, moe=MoEConfig(n_routed_experts=4, n_shared_experts=1, top_k=2,
                                                 expert_ffn_hidden=64, first_k_dense=1))
    outliers = {"name": "outliers", "method": "rtn", "weight": {"format": "int8", "granularity": "row"},
                "input": {"format": "int8", "granularity": "row", "dynamic": True}, "outliers": {"threshold": 1.0}}
    for config, preset, why in ((moe, _preset("rtn_w8"), "MoE"), (WIDE, _preset(outliers), "outlier")):
        ours, folder = _export(tmp_path / why, preset, config)
        written = json.loads((folder / "config.json").read_text())
        assert written["fp8train"]["layout"] == "fp8train" and why in written["fp8train"]["hf_note"]
        assert "model_type" not in written and "architectures" not in written
        with pytest.raises(ValueError, match="model_type"):
            transformers.AutoModelForCausalLM.from_pretrained(folder)
        tokens = batches(1, seq_len=32)[0]
        assert torch.equal(load_quantized(folder, build_from_config)(tokens), ours(tokens))


@pytest.mark.parametrize("symmetric", [True, False], ids=["w4_sym", "w4_asym"])
def test_mixed_precision_plan_in_transformers(tmp_path, symmetric):
    """A plan mixing formats (one config group per quantizer, HF module names as targets, a linear
    left in float in `ignore`) loads as one model and reproduces ours. With asymmetric INT4 groups
    transformers 5.24 refuses it, as config.json's transformers_note and docs/QUANTIZATION.md say:
    this case asserts that refusal, so a transformers that lifts it fails here and the note goes."""
    low = LayerPlan(QuantSpec("int4" if symmetric else "uint4", "tile", 128, symmetric))
    plan = QuantPlan(low, {"layers.0.mlp.down_proj": LayerPlan(QuantSpec("int8", "row")),
                           "layers.1.attn.q_proj": LayerPlan(QuantSpec("e4m3", "row")), "layers.1.attn.k_proj": None})
    model, preset = tiny_model(WIDE), _preset("rtn_w4_g128")
    quantize_decoder(model, preset, plan, batches(1))
    with pytest.warns(FusedGroupSplitWarning, match="layers.1.attn.q_proj"):  # split q/k/v: still loads in HF
        folder = save_quantized(model, tmp_path / "mixed", {"model_config": dataclasses.asdict(WIDE)})
    written = json.loads((folder / "config.json").read_text())
    quant = written["quantization_config"]
    assert quant["format"] == "mixed-precision" and "model.layers.1.self_attn.k_proj" in quant["ignore"]
    assert (written["fp8train"]["transformers_note"] is None) == symmetric
    if not symmetric:  # the packed asymmetric zero point (weight_zero_point [N/8, K/G] vs [N, K/G])
        with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
            transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        return
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert _max_diff(model, theirs, batches(1, seq_len=32)[0]) < TOLERANCE
