"""Session-wide test setup, imported before any test module.

On a machine without CUDA the Triton kernels run through Triton's interpreter. Triton decides
interpreted-or-compiled when a function is decorated, including its own standard library at
`import triton`, and importing fp8train.numerics can import triton indirectly (torch.compiler);
so TRITON_INTERPRET must be set here, before the first test module is imported.

One intra-op thread, here and in the processes the tests start (launch/train.py, torchrun's
workers, the benchmarks, sweep jobs inherit OMP_NUM_THREADS=1, as torchrun already sets for its
workers): the test tensors are tiny, so a second thread buys nothing, and where a core is busy
(a training subprocess, a second job on the machine) spin-waiting OpenMP threads made launches
two to four times slower. A thread count the caller set (OMP_NUM_THREADS) is kept. A test whose
bits depend on the thread count pins its own (tests/numerics/test_refactor_fingerprint.py).
"""

import os

import torch

if "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = "1"  # for child processes: OpenMP read it when torch loaded
    torch.set_num_threads(1)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
