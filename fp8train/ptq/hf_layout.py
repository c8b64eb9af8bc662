"""The Hugging Face Llama layout of a dense fp8train model: tensor names and config.json fields.

A dense fp8train Transformer (fp8train/models/llama.py) computes exactly what transformers'
`LlamaForCausalLM` computes, so a quantized folder written under HF's names with a LlamaConfig at the
top of config.json loads with `AutoModelForCausalLM.from_pretrained(folder)` (and is the layout vLLM
reads for compressed-tensors Llama checkpoints). The correspondence, checked piece by piece:

    fp8train                        HF Llama
    embed                           model.embed_tokens
    layers.N.attn_norm              model.layers.N.input_layernorm            RMSNorm, eps = norm_eps
    layers.N.attn.{q,k,v,o}_proj    model.layers.N.self_attn.{q,k,v,o}_proj   no bias (attention_bias false)
    layers.N.ffn_norm               model.layers.N.post_attention_layernorm
    layers.N.mlp.{gate,up,down}_proj model.layers.N.mlp.{gate,up,down}_proj   down(silu(gate) * up), no bias
    norm                            model.norm
    lm_head                         lm_head                                   tied to embed iff tie_embeddings

* RMSNorm: x * rsqrt(mean(x^2) + eps) * weight in FP32, in both (`rms_norm_eps` = `norm_eps`).
* RoPE: both rotate halves of each head, (i, i + head_dim/2), with angle pos * theta^(-2i/head_dim)
  ("default" rope type, no scaling): q/k rows are stored in the same order, no permutation (GGUF's
  adjacent-pair order is the odd one out, see fp8train.models.pretrained.unpermute_rope_rows).
* head_dim = d_model / n_heads; GQA: KV head j serves query heads j*r .. j*r + r - 1 (r = n_heads /
  n_kv_heads) in both (`repeat_interleave` here, `repeat_kv` there).
* MoE models (DeepSeek-style routed experts) are not Llama: they keep fp8train's names (see
  `hf_incompatibility`), and so do models with fp8train-only tensors (outlier channels).

tests/ptq/test_hf_export.py pins all of this: logits of transformers' model equal ours.
"""

from __future__ import annotations

import re
from enum import Enum

import torch

ARCHITECTURE = "LlamaForCausalLM"


class Layout(str, Enum):
    """Whose tensor names a quantized folder uses (config.json: fp8train.layout)."""

    HF_LLAMA = "hf_llama"  # HF Llama names + LlamaConfig fields: transformers / vLLM / fp8train read it
    FP8TRAIN = "fp8train"  # fp8train's own names (MoE, fp8train-only tensors): fp8train reads it

# (fp8train prefix, HF prefix, what must follow it), {i} = the layer index: applied to module and
# tensor names alike, in both directions (the regex tables below are built from this one list).
_NAME_PAIRS = [
    ("embed", "model.embed_tokens", r"\.|$"),
    ("norm", "model.norm", r"\.|$"),
    ("layers.{i}.attn_norm", "model.layers.{i}.input_layernorm", r"\.|$"),
    ("layers.{i}.ffn_norm", "model.layers.{i}.post_attention_layernorm", r"\.|$"),
    ("layers.{i}.attn.", "model.layers.{i}.self_attn.", r"[qkvo]_proj"),
    ("layers.{i}.mlp.", "model.layers.{i}.mlp.", r"(gate|up|down)_proj"),
    ("lm_head", "lm_head", r"\.|$"),
]


def _rename_table(source: int, target: int) -> list[tuple[str, str]]:
    """(regex, replacement) per pair, from column `source` to column `target` of _NAME_PAIRS."""
    return [(re.escape(pair[source]).replace(r"\{i\}", r"(\d+)") + f"(?={pair[2]})",
             pair[target].replace("{i}", r"\1")) for pair in _NAME_PAIRS]


_RENAMES, _BACK = _rename_table(0, 1), _rename_table(1, 0)


def _rename(name: str, table: list[tuple[str, str]], what: str) -> str:
    for pattern, replacement in table:
        renamed, count = re.subn("^" + pattern, replacement, name)
        if count:
            return renamed
    raise ValueError(f"{name!r} has no {what} name (the HF Llama layout covers dense models only: "
                     f"embed, layers.N.attn_norm/attn.*_proj/ffn_norm/mlp.*_proj, norm, lm_head)")


def to_hf_name(name: str) -> str:
    """fp8train module or tensor name -> HF Llama's (`layers.0.attn.q_proj.weight_packed` ->
    `model.layers.0.self_attn.q_proj.weight_packed`)."""
    return _rename(name, _RENAMES, "HF Llama")


def from_hf_name(name: str) -> str:
    """HF Llama module or tensor name -> fp8train's (the inverse of to_hf_name)."""
    return _rename(name, _BACK, "fp8train")


def hf_incompatibility(model_config: dict, has_outliers: bool, has_bias: bool) -> str | None:
    """Why a model cannot be written as an HF Llama, or None when it can."""
    if model_config.get("moe") is not None:
        return ("MoE model (routed experts): not an HF Llama; written under fp8train's names, "
                "fp8train.ptq.load_quantized reads it")
    if has_outliers:
        return ("outlier input channels kept in high precision (outlier_index / outlier_weight) have no "
                "compressed-tensors equivalent: a reader that ignores them would compute wrong outputs, "
                "so the folder is not marked as an HF model; only fp8train.ptq.load_quantized reads it")
    if has_bias:
        return "a quantized linear has a bias, which the Llama blocks written here do not have"
    return None


def llama_config(model_config: dict, dtype: torch.dtype) -> dict:
    """transformers' LlamaConfig fields (top level of config.json) for a dense fp8train ModelConfig
    (as a dict); `dtype` is the dtype of the high-precision tensors (embedding, norms)."""
    d_model, n_heads = model_config["d_model"], model_config["n_heads"]
    theta = float(model_config.get("rope_theta", 10000.0))
    dtype_name = str(dtype).removeprefix("torch.")
    return {
        "architectures": [ARCHITECTURE], "model_type": "llama",
        "vocab_size": model_config["vocab_size"], "hidden_size": d_model,
        "intermediate_size": model_config["ffn_hidden"], "num_hidden_layers": model_config["n_layers"],
        "num_attention_heads": n_heads, "num_key_value_heads": model_config["n_kv_heads"],
        "head_dim": d_model // n_heads, "hidden_act": "silu",
        "max_position_embeddings": model_config["max_seq_len"],
        "rms_norm_eps": float(model_config.get("norm_eps", 1e-5)),
        "rope_theta": theta,  # transformers < 5 and vLLM read this one ...
        "rope_parameters": {"rope_type": "default", "rope_theta": theta},  # ... transformers 5 this one
        "tie_word_embeddings": bool(model_config.get("tie_embeddings", False)),
        "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0,
        "initializer_range": float(model_config.get("init_std", 0.02)),
        "bos_token_id": None, "eos_token_id": None, "pad_token_id": None,  # fp8train tokenizers vary
        "torch_dtype": dtype_name, "dtype": dtype_name,
    }


def _asymmetric_packed(quant_config: dict) -> bool:
    return any(group.get("format") == "pack-quantized" and not group["weights"]["symmetric"]
               for group in quant_config["config_groups"].values())


def transformers_load_options(quant_config: dict) -> dict:
    """Load options for transformers that go into `quantization_config` (transformers' own
    CompressedTensorsConfig reads them from the file; compressed-tensors and vLLM ignore them).

    Asymmetric pack-quantized weights (INT4 with a zero point, packed 8 per int32 along the output
    dimension) need `dequantize: true` with transformers 5.24 + compressed-tensors 0.20: on the
    default route compressed-tensors lays out the model on the meta device with an UNPACKED zero
    point ([N, K/G]) and the load stops at "weight_zero_point | MISMATCH | Reinit due to size
    mismatch - ckpt: torch.Size([N/8, K/G]) vs model: torch.Size([N, K/G])" (known upstream:
    vllm-project/llm-compressor#1618). With `dequantize: true` the weights are decompressed to
    dense at load time, which loads correctly (tests/ptq/test_hf_export.py). That route decodes
    every dense layer with the FIRST config group's scheme, so it is only written for one group."""
    one_group = len(quant_config["config_groups"]) == 1
    return {"dequantize": True} if one_group and _asymmetric_packed(quant_config) else {}


def transformers_limitation(quant_config: dict) -> str | None:
    """What transformers (5.24, compressed-tensors 0.20) cannot load of this config, or None."""
    if len(quant_config["config_groups"]) > 1 and _asymmetric_packed(quant_config):
        return ("transformers 5.24 cannot load a mixed-precision folder with asymmetric INT4 groups: its "
                "default route fails on the packed weight_zero_point (size mismatch, llm-compressor#1618) and "
                "its dequantize route decodes every layer with the first group's scheme; fp8train reads it, "
                "and the layout is compressed-tensors' own (vLLM's reader takes per-group schemes)")
    return None
