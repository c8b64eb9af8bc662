"""quantize_decoder: the block-by-block PTQ pipeline (GPTQ's sequential scheme, for every method).

    x = embed(calibration tokens)                          hidden states entering block 0
    for each block:
        smoothquant / awq: search and fold per-channel scales (float function unchanged)
        one pass over x with hooks on the block's planned linears: per-channel max|x| and
            mean|x|, GPTQ Hessians (every linear of the block sees the same inputs, produced by
            the ALREADY-QUANTIZED blocks before it)
        quantize each linear (RTN or GPTQ; outlier input channels kept high precision; static
            input scales from max|x|), swap it for a QuantizedLinear
        x = block(x)                                        with the quantized block: next inputs

RTN without activation statistics needs no calibration and skips the passes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm import tqdm

from fp8train.ptq import awq as awq_lib
from fp8train.ptq.config import Method, PtqConfig
from fp8train.ptq.decoder import block_linears, check_decoder, fold_scale, run_block, scale_groups, set_submodule
from fp8train.ptq.gptq import HessianAccumulator, gptq_quantize
from fp8train.ptq.plan import LayerPlan, QuantPlan
from fp8train.ptq.quantized_linear import QuantizedLinear
from fp8train.ptq.rtn import check_weight_shape, rtn_quantize
from fp8train.ptq.smoothquant import smoothing_scales


@dataclass
class LayerStats:
    absmax: torch.Tensor | None = None
    absmean_sum: torch.Tensor | None = None
    tokens: int = 0
    hessian: HessianAccumulator | None = None

    def add(self, x: torch.Tensor, hessian: bool) -> None:
        flat = x.detach().reshape(-1, x.shape[-1]).float()
        amax, asum = flat.abs().amax(dim=0), flat.abs().sum(dim=0)
        self.absmax = amax if self.absmax is None else torch.maximum(self.absmax, amax)
        self.absmean_sum = asum if self.absmean_sum is None else self.absmean_sum + asum
        self.tokens += flat.shape[0]
        if hessian:
            if self.hessian is None:
                self.hessian = HessianAccumulator(x.shape[-1], x.device)
            self.hessian.add_batch(x.detach())


@dataclass
class PtqReport:
    layers: dict[str, dict] = field(default_factory=dict)
    seconds: float = 0.0
    block_seconds: list[float] = field(default_factory=list)  # wall time per block (CUDA synchronized)


def planned_linears(model: nn.Module, plan: QuantPlan) -> dict[str, tuple[int, str, LayerPlan]]:
    """full name -> (block index, path in block, plan) for every linear the plan quantizes."""
    out = {}
    for i, block in enumerate(model.layers):
        for path, linear in block_linears(block).items():
            name = f"layers.{i}.{path}"
            layer_plan = plan.for_layer(name)
            if layer_plan is not None:
                check_weight_shape(layer_plan.weight, linear.out_features, linear.in_features, name)
                out[name] = (i, path, layer_plan)
    return out


@torch.no_grad()
def _collect(block, paths: list[str], xs, cos, sin, hessian: bool) -> dict[str, LayerStats]:
    stats = {path: LayerStats() for path in paths}
    handles = [block.get_submodule(path).register_forward_hook(
        lambda mod, args, out, s=stats[path]: s.add(args[0], hessian)) for path in paths]
    try:
        for x in xs:
            run_block(block, x, cos, sin)
    finally:
        for handle in handles:
            handle.remove()
    return stats


def _smooth_block(block, xs, cos, sin, plans: dict[str, LayerPlan], alpha: float) -> None:
    groups = [g for g in scale_groups(block) if block.get_submodule(g.prev).weight.dim() == 1
              and all(path in plans for path in g.linears)]
    stats = _collect(block, [g.linears[0] for g in groups], xs, cos, sin, hessian=False)
    for group in groups:
        linears = [block.get_submodule(path) for path in group.linears]
        scale = smoothing_scales(stats[group.linears[0]].absmax, [lin.weight for lin in linears], alpha)
        fold_scale(block.get_submodule(group.prev), scale, linears)


def _keep(store: dict, key: str, x: torch.Tensor) -> None:
    """Forward-hook body: remember x (a hook must return None or it replaces the output)."""
    store.setdefault(key, x.detach())


@torch.no_grad()
def _awq_block(block, xs, cos, sin, plans: dict[str, LayerPlan], options) -> None:
    sample = torch.cat(xs)[: options.search_samples]
    groups = [g for g in scale_groups(block) if all(path in plans for path in g.linears)]
    for group in groups:
        captured = {}
        handle = block.get_submodule(group.linears[0]).register_forward_hook(
            lambda mod, args, out: _keep(captured, "x", args[0]))
        run_block(block, sample, cos, sin)
        handle.remove()
        inspect_module = block.get_submodule(group.inspect)
        inspect = (lambda x: inspect_module(x, cos, sin)) if group.inspect_takes_rope else inspect_module
        linears = [block.get_submodule(path) for path in group.linears]
        scale = awq_lib.search_group_scale(captured["x"], linears, [plans[p].weight for p in group.linears],
                                           inspect, options.grid)
        fold_scale(block.get_submodule(group.prev), scale, linears)
    if options.clip:
        clip_paths = [p for p in plans if p.rpartition(".")[2] not in awq_lib.CLIP_SKIPPED]
        inputs: dict[str, torch.Tensor] = {}
        handles = [block.get_submodule(p).register_forward_hook(
            lambda mod, args, out, p=p: _keep(inputs, p, args[0])) for p in clip_paths]
        run_block(block, sample, cos, sin)
        for handle in handles:
            handle.remove()
        for path in clip_paths:
            linear = block.get_submodule(path)
            linear.weight.data = awq_lib.search_clip(linear.weight.data, inputs[path], plans[path].weight, options)


def _input_step(layer_plan: LayerPlan, absmax: torch.Tensor) -> torch.Tensor | None:
    """Decode step of a static (calibrated per-tensor) input quantizer from max|x|."""
    spec = layer_plan.input
    if spec is None or spec.dynamic:
        return None
    amax = absmax.max().clamp(min=1e-8)
    return amax / spec.fmt.max


def _quantize_linear(linear: nn.Linear, layer_plan: LayerPlan, stats: LayerStats | None,
                     config: PtqConfig) -> tuple[QuantizedLinear, dict]:
    weight = linear.weight.detach().float().clone()
    outliers = None
    threshold = config.outliers.threshold
    if threshold is not None and stats is not None:
        outliers = torch.nonzero(stats.absmax > threshold).flatten()
        outliers = outliers if outliers.numel() else None
    info: dict = {"weight": layer_plan.weight.describe(), "outliers": 0 if outliers is None else outliers.numel()}
    if outliers is not None:
        outlier_weight = weight[:, outliers].clone()
        weight[:, outliers] = 0.0
    if config.method is Method.GPTQ and not layer_plan.weight.fmt.is_float:  # FP8 layers of a plan: RTN
        hessian = stats.hessian.hessian.clone()
        if outliers is not None:  # an outlier channel becomes a "dead" input for GPTQ: W[:, j] = 0
            hessian[outliers, :] = 0.0
            hessian[:, outliers] = 0.0
        result = gptq_quantize(weight, hessian, layer_plan.weight, config.gptq)
        quantized, info["gptq_loss"] = result.quantized, result.loss
    else:
        quantized = rtn_quantize(weight, layer_plan.weight)
    input_step = _input_step(layer_plan, stats.absmax if stats is not None else None) if layer_plan.input else None
    if outliers is not None and input_step is not None:
        keep = torch.ones_like(stats.absmax, dtype=torch.bool)
        keep[outliers] = False
        input_step = _input_step(layer_plan, stats.absmax[keep])
    module = QuantizedLinear.from_weight(
        quantized, layer_plan.weight, layer_plan.input, bias=linear.bias, input_scale_inv=input_step,
        outlier_index=outliers, outlier_weight=None if outliers is None else outlier_weight.to(linear.weight.dtype))
    return module.to(linear.weight.device), info


def _needs_calibration(config: PtqConfig, plans) -> bool:
    static_inputs = any(p.input is not None and not p.input.dynamic for p in plans)
    return config.method is not Method.RTN or config.outliers.threshold is not None or static_inputs


@torch.no_grad()
def quantize_decoder(model: nn.Module, config: PtqConfig, plan: QuantPlan, batches: list[torch.Tensor] | None,
                     progress: bool = False) -> PtqReport:
    """Quantize `model` in place (see the module docstring); `batches`: int64 [b, T] token ids."""
    check_decoder(model)
    targets = planned_linears(model, plan)
    plan.check_layers({f"layers.{i}.{p}" for i, b in enumerate(model.layers) for p in block_linears(b)})
    calibrate = _needs_calibration(config, [t[2] for t in targets.values()])
    if calibrate and not batches:
        raise ValueError(f"method {config.method.value} needs calibration batches")
    report, started = PtqReport(), time.perf_counter()
    device = next(model.parameters()).device
    xs = [model.embed(b.to(device)) for b in batches] if calibrate else []
    cos, sin = model.rope(xs[0].shape[1]) if calibrate else (None, None)
    for i, block in enumerate(tqdm(model.layers, desc=f"{config.name}: blocks", disable=not progress)):
        block_started = time.perf_counter()
        plans = {path: lp for name, (b, path, lp) in targets.items() if b == i}
        if calibrate and plans and config.method is Method.SMOOTHQUANT:
            _smooth_block(block, xs, cos, sin, plans, config.smoothquant.alpha)
        if calibrate and plans and config.method is Method.AWQ:
            _awq_block(block, xs, cos, sin, plans, config.awq)
        stats = _collect(block, list(plans), xs, cos, sin, config.method is Method.GPTQ) if calibrate else {}
        for path, layer_plan in plans.items():
            module, info = _quantize_linear(block.get_submodule(path), layer_plan, stats.get(path), config)
            set_submodule(block, path, module)
            report.layers[f"layers.{i}.{path}"] = info
        if calibrate:
            xs = [run_block(block, x, cos, sin) for x in xs]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        report.block_seconds.append(time.perf_counter() - block_started)
    report.seconds = time.perf_counter() - started
    return report
