"""Session-wide test setup, imported before any test module.

On a machine without CUDA the Triton kernels run through Triton's interpreter. Triton decides
interpreted-or-compiled when a function is decorated, including its own standard library at
`import triton`, and importing fp8train.numerics can import triton indirectly (torch.compiler);
so TRITON_INTERPRET must be set here, before the first test module is imported.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
