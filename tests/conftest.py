"""Session-wide test setup, imported before any test module.

On a machine without CUDA the Triton kernels run through Triton's interpreter. Triton decides
interpreted-or-compiled when a function is decorated, including its own standard library at
`import triton`, and importing fp8train.numerics can import triton indirectly (torch.compiler);
so TRITON_INTERPRET must be set here, before the first test module is imported.

Processes the tests start (launch/train.py, torchrun's workers, the benchmarks, sweep jobs) inherit
OMP_NUM_THREADS=1, as torchrun already sets for its workers: the test models are tiny, so a
second intra-op thread buys nothing, and where a core is busy (the test runner's other work, a
second job on the machine) its spin-waiting OpenMP threads made a launch two to four times
slower. It is set after `import torch`: this process keeps its own thread count (OpenMP reads
the variable when torch loads it), only children see the 1. A value set by the caller is kept.
"""

import os

import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
