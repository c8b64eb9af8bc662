"""Post-training quantization of trained decoders: RTN, GPTQ, AWQ, SmoothQuant, FP8 W8A8,
outlier-aware and sensitivity-driven mixed precision, export to compressed-tensors.

    config = PtqConfig.from_dict(yaml.safe_load(open("conf/quant/gptq_w4_g128.yaml")))
    plan = uniform_plan(config.weight, config.input)          # or QuantPlan.load(path), greedy_plan(...)
    report = quantize_decoder(model, config, plan, calibration_batches(tokens, 128, 2048))
    save_quantized(model, "out/", metadata={"model_config": ...})
    model = load_quantized("out/", build_model=...)            # launch code passes the model builder

Module map: decoder (the protocol PTQ walks through; scale groups), quantized_linear (the module,
its reference forward and the kernel hook), rtn, gptq, awq, smoothquant, config (presets as data),
plan (mixed precision), fused_groups (q/k/v and gate/up: one quantizer per fused matmul), pipeline
(block-by-block driver), sensitivity, data (calibration and perplexity), export (safetensors +
compressed-tensors), report (JSON, Markdown, PNG).

Bottom layer: imports torch, fp8train.quant and (lazily) safetensors / compressed-tensors; never
fp8train.models, train or sweep. The numbers rules (grids, rounding, zero points) are the core's.
"""

from fp8train.ptq.config import Method, PtqConfig
from fp8train.ptq.data import ArrayTokens, calibration_batches, eval_windows, evaluate_perplexity
from fp8train.ptq.export import load_quantized, save_quantized
from fp8train.ptq.gptq import GptqOptions, HessianAccumulator, gptq_quantize
from fp8train.ptq.pipeline import quantize_decoder
from fp8train.ptq.plan import LayerPlan, QuantPlan, greedy_plan, uniform_plan
from fp8train.ptq.quantized_linear import QuantizedLinear, reference_forward

__all__ = ["ArrayTokens", "GptqOptions", "HessianAccumulator", "LayerPlan", "Method", "PtqConfig", "QuantPlan",
           "QuantizedLinear", "calibration_batches", "eval_windows", "evaluate_perplexity", "gptq_quantize",
           "greedy_plan", "load_quantized", "quantize_decoder", "reference_forward", "save_quantized", "uniform_plan"]
