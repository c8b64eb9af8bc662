"""Per-layer sensitivity: the loss increase when ONLY that linear is quantized (RTN), all else float.

    for each block b, for each linear l in b:
        swap W_l for RTN(W_l) with each candidate quantizer, run blocks b.. to the loss, restore
Inputs of block b are computed once (the float model), so each trial runs only the tail of the
network. The rows feed `plan.greedy_plan` (the automatic mixed-precision plan) and the report.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from fp8train.ptq.decoder import block_linears, check_decoder, run_block
from fp8train.ptq.rtn import check_weight_shape, rtn_quantize
from fp8train.quant.spec import QuantSpec


@torch.no_grad()
def _tail_loss(model: nn.Module, start: int, x: torch.Tensor, labels: torch.Tensor, cos, sin) -> float:
    for block in list(model.layers)[start:]:
        x = run_block(block, x, cos, sin)
    logits = model.lm_head(model.norm(x))
    return float(F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1)))


@torch.no_grad()
def layer_sensitivity(model: nn.Module, windows: torch.Tensor, candidates: dict[str, QuantSpec],
                      progress: bool = False) -> list[dict]:
    """Rows {'layer', 'numel', 'loss_<candidate>', 'delta_<candidate>'} for every block linear.

    windows: [W, T + 1] token windows (a few are enough: the ranking is what matters)."""
    check_decoder(model)
    device = next(model.parameters()).device
    windows = windows.to(device)
    inputs, labels = windows[:, :-1], windows[:, 1:]
    cos, sin = model.rope(inputs.shape[1])
    x = model.embed(inputs)
    base = _tail_loss(model, 0, x, labels, cos, sin)
    rows = []
    for b, block in enumerate(tqdm(model.layers, desc="sensitivity", disable=not progress)):
        for path, linear in block_linears(block).items():
            name = f"layers.{b}.{path}"
            row = {"layer": name, "numel": linear.weight.numel(), "loss_base": base}
            original = linear.weight.data
            for label, spec in candidates.items():
                check_weight_shape(spec, linear.out_features, linear.in_features, name)
                linear.weight.data = rtn_quantize(original, spec).dequantize().to(original.dtype)
                try:
                    row[f"loss_{label}"] = _tail_loss(model, b, x, labels, cos, sin)
                finally:
                    linear.weight.data = original
                row[f"delta_{label}"] = row[f"loss_{label}"] - base
            rows.append(row)
        x = run_block(block, x, cos, sin)
    return rows
