"""Round-to-nearest weight quantization (the baseline every PTQ method is measured against).

RTN is the core's CURRENT-scaling quantizer applied to W [N, K] with the preset's QuantSpec:
per output channel (row), per 1xG tile along K (INT4 g128/g64/g32), or per GxG block (FP8).

Zero-point convention (the core's, GPTQ's and AWQ's): asymmetric grids use unsigned codes
0..2^b-1 and an INTEGER zero point, x ~= (q - zero) * step, step = (max - min) / (2^b - 1),
zero = round(-min / step). Symmetric grids use signed codes -qmax..qmax (INT4: +-7, INT8: +-127),
step = absmax / qmax, no zero point. compressed-tensors stores the asymmetric grid shifted to
signed codes (q - 2^(b-1), zero - 2^(b-1)); export.py does the shift.

Group sizes must divide K (no padding): SmolLM2's K = 576 takes g64 or g32, not g128.
"""

from __future__ import annotations

import torch

from fp8train.quant.granularity import GranularityKind
from fp8train.quant.spec import QuantSpec
from fp8train.quant.tensor import QuantizedTensor


def check_weight_shape(spec: QuantSpec, out_features: int, in_features: int, name: str) -> None:
    """ValueError naming the layer and the group sizes that would fit."""
    grid = spec.grid
    if grid.kind not in (GranularityKind.TILE, GranularityKind.BLOCK):
        return
    g = grid.size
    bad_k = in_features % g != 0
    bad_n = grid.kind is GranularityKind.BLOCK and out_features % g != 0
    if bad_k or bad_n:
        dims = [d for d, bad in ((in_features, bad_k), (out_features, bad_n)) if bad]
        fits = [c for c in (256, 128, 64, 32, 16) if all(d % c == 0 for d in dims)]
        raise ValueError(f"{name}: group_size={g} does not divide {'in_features' if bad_k else 'out_features'}="
                         f"{dims[0]} (weight [{out_features}, {in_features}]); choose a group size that "
                         f"divides it ({fits or 'none of 16..256'}) or keep this layer out of the plan "
                         f"(fp8train does not pad groups)")


def rtn_quantize(weight: torch.Tensor, spec: QuantSpec) -> QuantizedTensor:
    """W [N, K] -> codes and steps with the spec's own grid (fp8train.quant.reference.quantize)."""
    return spec.quantize(weight.detach().float())
