"""The quantized model folder: safetensors in the compressed-tensors layout plus config.json.

    <folder>/model.safetensors
        names: HF Llama's for a dense model (`model.layers.0.self_attn.q_proj.weight_packed`, see
        hf_layout), fp8train's for the rest (MoE, outlier channels: `layers.0.attn.q_proj...`)
        high-precision tensors under their own names (embed, norms, lm_head unless tied, ...)
        per quantized linear `<name>.`, by compressed-tensors format:
          pack-quantized  (INT4)  weight_packed int32 [N, K/8], weight_shape, weight_scale,
                                  weight_zero_point (asymmetric: int32, packed along N)
          int-quantized   (INT8)  weight int8 [N, K], weight_scale, weight_zero_point (asymmetric)
          float-quantized (FP8)   weight float8_e4m3fn [N, K], weight_scale
          input_scale (static activations); outlier_index, outlier_weight (fp8train only: input
          channels kept high precision, which compressed-tensors readers do not know)
    <folder>/config.json
        LlamaConfig fields    dense models only (architectures, model_type, hidden_size, ...):
                              AutoModelForCausalLM.from_pretrained(folder) loads it
        quantization_config   compressed-tensors' QuantizationConfig (one config group per
                              quantizer, targets = module names, or `Linear` for a uniform one;
                              format per group; transformers load options, hf_layout)
        fp8train              what rebuilds the model here: model_config, per-layer quantizers
                              (under fp8train's names), the preset, the source, `layout`
                              (hf_llama | fp8train), `hf_note` (why not an HF model) and
                              `split_fused_groups` (fused_groups.py: q/k/v or gate/up members with
                              different quantizers, which vLLM/SGLang refuse; exporting one warns)

weight_scale is the decode step (the core's scale_inv): w ~= (q - zero) * weight_scale.
compressed-tensors stores every integer grid with SIGNED codes: an asymmetric b-bit grid's codes
q in [0, 2^b - 1] and zero point z are written as q - 2^(b-1) and z - 2^(b-1) (same decode).
The packing, the config classes and (in the tests) the decompression are compressed-tensors' own.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from fp8train.ptq.decoder import set_submodule
from fp8train.ptq.fused_groups import scheme_key, warn_split_groups
from fp8train.ptq.hf_layout import (Layout, from_hf_name, hf_incompatibility, llama_config, to_hf_name,
                                   transformers_limitation, transformers_load_options)
from fp8train.ptq.quantized_linear import QuantizedLinear
from fp8train.quant.granularity import GranularityKind
from fp8train.quant.spec import QuantSpec

WEIGHTS_FILE, CONFIG_FILE = "model.safetensors", "config.json"
# our granularity -> compressed-tensors' QuantizationStrategy value (a ROW activation is per "token")
_STRATEGY = {GranularityKind.ROW: "channel", GranularityKind.TILE: "group", GranularityKind.BLOCK: "block",
             GranularityKind.TENSOR: "tensor"}


def ct_format(spec: QuantSpec) -> str:
    if spec.fmt.is_float:
        return "float-quantized"
    return "pack-quantized" if spec.bits == 4 else "int-quantized"


def ct_args(spec: QuantSpec, activation: bool = False) -> dict:
    """compressed-tensors QuantizationArgs (as a dict) of one QuantSpec."""
    kind = spec.kind
    strategy = "token" if activation and kind is GranularityKind.ROW else _STRATEGY[kind]
    args = {"num_bits": spec.bits, "type": "float" if spec.fmt.is_float else "int",
            "symmetric": spec.symmetric, "strategy": strategy,
            "dynamic": bool(activation and spec.dynamic)}
    if kind is GranularityKind.TILE:
        args["group_size"] = spec.group_size
    if kind is GranularityKind.BLOCK:
        args["block_structure"] = [spec.group_size, spec.group_size]
    return args


def _offset(spec: QuantSpec) -> int:
    """What is subtracted from our codes to get compressed-tensors' signed codes."""
    return 0 if spec.fmt.is_float or spec.fmt.signed else 2 ** (spec.bits - 1)


def require_export_packages() -> None:
    """Raise a ValueError naming the fix when the compressed-tensors package (the export's packing
    helpers) is missing: called before any work, so hours of calibration are never lost to it."""
    try:
        import compressed_tensors  # noqa: F401
    except ImportError as error:
        raise ValueError(f"the export needs the compressed-tensors package ({error}); install it "
                         f"(`pip install compressed-tensors`, a dependency of fp8train) or pass export=false "
                         f"to quantize and evaluate without writing a model folder") from error


def compress_linear(layer: QuantizedLinear) -> dict[str, torch.Tensor]:
    """One QuantizedLinear -> its compressed-tensors tensors (local names)."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    spec, out = layer.weight_spec, {}
    scale = layer.weight_scale_inv.float()
    out["weight_scale"] = scale.reshape(1) if spec.kind is GranularityKind.TENSOR else scale.contiguous()
    shift = _offset(spec)
    codes = layer.weight_codes if spec.fmt.is_float else (layer.weight_codes.to(torch.int16) - shift).to(torch.int8)
    zero = None if layer.weight_zero_point is None else (layer.weight_zero_point.to(torch.int16) - shift).to(torch.int8)
    if ct_format(spec) == "pack-quantized":
        out["weight_packed"] = pack_to_int32(codes, spec.bits)
        out["weight_shape"] = torch.tensor(list(codes.shape))
        if zero is not None:
            out["weight_zero_point"] = pack_to_int32(zero, spec.bits, packed_dim=0).contiguous()
    else:
        out["weight"] = codes.contiguous()
        if zero is not None:
            out["weight_zero_point"] = zero.contiguous()
    if layer.input_scale_inv is not None:
        out["input_scale"] = layer.input_scale_inv.float().reshape(1)
    if layer.outlier_index is not None:
        out["outlier_index"], out["outlier_weight"] = layer.outlier_index, layer.outlier_weight.contiguous()
    if layer.bias is not None:
        out["bias"] = layer.bias.detach()
    return out


def quantization_config(layers: dict[str, QuantizedLinear], ignore: list[str], collapse: bool = False) -> dict:
    """compressed-tensors' QuantizationConfig for these layers, as a plain dict. Targets are module
    names; with `collapse`, one group covering every quantized layer targets the class name
    `Linear` instead (with `ignore` naming the linears left out), as llm-compressor writes it."""
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme

    groups: dict[tuple, list[str]] = {}
    for name, layer in layers.items():
        key = (json.dumps(layer.weight_spec.to_dict()), json.dumps(layer.input_spec and layer.input_spec.to_dict()))
        groups.setdefault(key, []).append(name)
    schemes, formats = {}, set()
    for index, ((weight, inp), names) in enumerate(groups.items()):
        wspec = QuantSpec(**json.loads(weight))
        ispec = None if inp == "null" else QuantSpec(**json.loads(inp))
        fmt = ct_format(wspec)
        formats.add(fmt)
        schemes[f"group_{index}"] = QuantizationScheme(
            targets=["Linear"] if collapse and len(groups) == 1 else names, weights=ct_args(wspec), format=fmt,
            input_activations=None if ispec is None else ct_args(ispec, activation=True))
    config = QuantizationConfig(config_groups=schemes, format=formats.pop() if len(formats) == 1 else "mixed-precision",
                                quantization_status="compressed", ignore=ignore)
    return json.loads(json.dumps(config.model_dump(), default=str))


def save_quantized(model: nn.Module, folder: str | Path, metadata: dict, overwrite: bool = False,
                   extra_files: dict[str, Path] | None = None) -> Path:
    """Write `model` (with QuantizedLinear layers) to `folder`. `metadata` must hold 'model_config'.
    A dense model is written in the HF Llama layout (hf_layout); others under fp8train's names."""
    from safetensors.torch import save_file

    folder = Path(folder)
    replace = folder.exists() and any(folder.iterdir())
    if replace and not overwrite:
        raise ValueError(f"export path {folder} already exists and is not empty; choose another "
                         f"output folder or pass overwrite=true")
    require_export_packages()
    if "model_config" not in metadata:
        raise ValueError("metadata needs 'model_config' (what build_model rebuilds the float model from)")
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    split = _warn_split_groups(model, layers)
    hf_note = hf_incompatibility(metadata["model_config"], any(m.outlier_index is not None for m in layers.values()),
                                 any(m.bias is not None for m in layers.values()))
    rename = (lambda name: name) if hf_note else to_hf_name
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in model.state_dict().items():
        owner = name.rpartition(".")[0]
        if owner in layers or tensor.data_ptr() in seen:
            continue  # quantized layers are written below; a tied tensor once
        seen.add(tensor.data_ptr())
        tensors[rename(name)] = tensor.detach().contiguous()
    dtype = next((t.dtype for t in tensors.values() if t.is_floating_point()), torch.float32)
    for name, layer in layers.items():
        tensors.update({f"{rename(name)}.{key}": value for key, value in compress_linear(layer).items()})
    if replace:  # only now that everything to write is in memory: a failure above leaves the old folder
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    ignore = [rename(n) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    layer_meta = {name: {"weight": m.weight_spec.to_dict(), "input": m.input_spec and m.input_spec.to_dict(),
                         "bias": m.bias is not None,
                         "outliers": 0 if m.outlier_index is None else int(m.outlier_index.numel())}
                  for name, m in layers.items()}
    quant_config = quantization_config({rename(n): m for n, m in layers.items()}, ignore, collapse=not hf_note)
    layout = {"layout": (Layout.FP8TRAIN if hf_note else Layout.HF_LLAMA).value, "hf_note": hf_note,
              "transformers_note": None if hf_note else transformers_limitation(quant_config),
              "split_fused_groups": [list(group) for group in split]}
    config = {**({} if hf_note else llama_config(metadata["model_config"], dtype)),
              "quantization_config": {**quant_config, **({} if hf_note else transformers_load_options(quant_config))},
              "fp8train": {**metadata, **layout, "layers": layer_meta}}
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=1, default=str))
    for target, source in (extra_files or {}).items():
        shutil.copy(source, folder / target)
    return folder


def _warn_split_groups(model: nn.Module, layers: dict[str, QuantizedLinear]) -> list[tuple[str, ...]]:
    """FusedGroupSplitWarning when q/k/v or gate/up members got different quantizers (or some kept)."""
    kept = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    schemes = {**{n: None for n in kept}, **{n: scheme_key(m.weight_spec, m.input_spec) for n, m in layers.items()}}
    describe = {**{n: "kept high precision" for n in kept},
                **{n: m.weight_spec.describe() + ("" if m.input_spec is None else f", input {m.input_spec.describe()}")
                   for n, m in layers.items()}}
    return warn_split_groups(schemes, describe)


def decompress_codes(tensors: dict[str, torch.Tensor], spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Our codes and zero point back from compressed-tensors' tensors of one layer."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    shift = _offset(spec)
    zero = tensors.get("weight_zero_point")
    if "weight_packed" in tensors:
        shape = torch.Size(tensors["weight_shape"].tolist())
        codes = unpack_from_int32(tensors["weight_packed"], spec.bits, shape)
        if zero is not None:
            zero = unpack_from_int32(zero, spec.bits, torch.Size((shape[0], tensors["weight_scale"].shape[-1])),
                                     packed_dim=0)
    else:
        codes = tensors["weight"]
    if not spec.fmt.is_float:
        codes = (codes.to(torch.int16) + shift).to(spec.fmt.dtype)
        zero = None if zero is None else (zero.to(torch.int16) + shift).to(spec.fmt.dtype)
    return codes, zero


def read_config(folder: str | Path) -> dict:
    path = Path(folder) / CONFIG_FILE
    if not path.is_file() or not (Path(folder) / WEIGHTS_FILE).is_file():
        raise ValueError(f"{folder} is not a quantized model folder (needs {CONFIG_FILE} and {WEIGHTS_FILE})")
    config = json.loads(path.read_text())
    if "fp8train" not in config:
        raise ValueError(f"{path} was not written by fp8train.ptq.save_quantized (no 'fp8train' section)")
    return config


def load_quantized(folder: str | Path, build_model: Callable[[dict], nn.Module]) -> nn.Module:
    """Rebuild the model written by save_quantized: build_model(metadata['model_config']) gives the
    float model (launch code passes fp8train.models' builder), whose planned linears are swapped."""
    from safetensors.torch import load_file

    config = read_config(folder)
    meta = config["fp8train"]
    tensors = load_file(str(Path(folder) / WEIGHTS_FILE))
    if meta.get("layout", Layout.FP8TRAIN.value) == Layout.HF_LLAMA.value:
        tensors = {from_hf_name(name): tensor for name, tensor in tensors.items()}
    model = build_model(meta["model_config"])
    for name, info in meta["layers"].items():
        local = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
        wspec = QuantSpec(**info["weight"])
        ispec = None if info["input"] is None else QuantSpec(**info["input"])
        codes, zero = decompress_codes(local, wspec)
        linear = model.get_submodule(name)
        layer = QuantizedLinear(linear.in_features, linear.out_features, wspec, ispec, info["bias"],
                                info["outliers"], linear.weight.dtype)
        layer.weight_codes.copy_(codes)
        layer.weight_scale_inv.copy_(local["weight_scale"].reshape(layer.weight_scale_inv.shape))
        if zero is not None:
            layer.weight_zero_point.copy_(zero)
        if layer.input_scale_inv is not None:
            layer.input_scale_inv.copy_(local["input_scale"].reshape(()))
        if info["outliers"]:
            layer.outlier_index.copy_(local["outlier_index"])
            layer.outlier_weight.copy_(local["outlier_weight"])
        if info["bias"]:
            layer.bias.data.copy_(local["bias"])
        set_submodule(model, name, layer.to(linear.weight.device))
        for key in local:
            tensors.pop(f"{name}.{key}")
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    tied = [k for k in missing if k.rpartition(".")[0] in meta["layers"] or _is_tied(model, k)]
    if set(missing) - set(tied) or unexpected:
        raise ValueError(f"{folder}: tensors do not match the model: missing {sorted(set(missing) - set(tied))[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
    return model


def _is_tied(model: nn.Module, key: str) -> bool:
    owner, _, attr = key.rpartition(".")
    tensor = getattr(model.get_submodule(owner), attr)
    return any(tensor is p for n, p in model.named_parameters() if n != key)
