"""Plain high-precision building blocks shared by the models and the FP8 layer.

`GroupedLinear` (the MoE experts' weights) lives here, below both: the models build it, and the
FP8 module swap (fp8train.numerics.convert) recognises and replaces it, without either package
importing the other. `apply_to_same_input` runs several layers on one input so that FP8 layers
can cast it once (q/k/v, gate/up) while the models keep calling plain modules.
"""

from fp8train.nn.grouped_linear import GroupedLinear, grouped_linear, grouped_mm_applicable
from fp8train.nn.shared_input import apply_to_same_input

__all__ = ["GroupedLinear", "apply_to_same_input", "grouped_linear", "grouped_mm_applicable"]
