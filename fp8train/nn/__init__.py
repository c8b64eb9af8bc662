"""Plain high-precision building blocks shared by the models and the FP8 layer.

`GroupedLinear` (the MoE experts' weights) lives here, below both: the models build it, and the
FP8 module swap (fp8train.numerics.convert) recognises and replaces it, without either package
importing the other.
"""

from fp8train.nn.grouped_linear import GroupedLinear, grouped_linear, grouped_mm_applicable

__all__ = ["GroupedLinear", "grouped_linear", "grouped_mm_applicable"]
