"""Fake quantization with a straight-through estimator (STE): train against the serving grid.

Forward, an operand is replaced by its quantize-dequantize image under a QuantSpec,

    x_q = dequantize(quantize(x))            fp8train.quant.reference.fake_quantize (the core's rule)

so the loss sees exactly the rounding and clipping the exported model will have. Rounding has a
zero derivative almost everywhere, so backward passes the gradient straight through,

    dL/dx := dL/dx_q                         (Bengio et al. 2013; the standard QAT estimator)

The scales come from the tensor itself (CURRENT scaling: max-abs or min/max per group), so no value
is ever clipped and there is no clipping mask to apply: the plain identity STE is exact here.

Operands of any rank are quantized as a matrix [-1, C] whose last dimension C is the contraction
dimension: weights [out, in] per output row / 1xG group along `in`, activations [..., features]
per token (row) or per 1xG tile of features.
"""

from __future__ import annotations

import torch
from torch import nn

from fp8train.quant.spec import QuantSpec


class _FakeQuantizeSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:  # noqa: ARG004
        return spec.fake_quantize(x.reshape(-1, x.shape[-1])).reshape(x.shape)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ARG004
        return grad, None


def fake_quantize_ste(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """spec's quantize-dequantize of x (any rank, last dim contracted), identity gradient."""
    return _FakeQuantizeSTE.apply(x, spec)


class FakeQuantize(nn.Module):
    """One operand role's fake quantizer. Holds no state (scales are recomputed every call), so a
    model with FakeQuantize modules has the same state_dict as without them."""

    def __init__(self, spec: QuantSpec, role: str):
        super().__init__()
        self.spec, self.role = spec, role

    def extra_repr(self) -> str:
        return f"role={self.role}, {self.spec.describe()}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fake_quantize_ste(x, self.spec)
