"""Print this process's run id and launch id (run by torchrun in test_run_id.py)."""

import os

from fp8train.train.run_id import compute_launch_id, compute_run_id

if os.environ.get("DROP_ELASTIC_ID"):  # exercise the parent-process fallback under torchrun
    os.environ.pop("TORCHELASTIC_RUN_ID", None)
# one os.write per line: two ranks share the pipe, and print() may split text and newline
os.write(1, f"rank={os.environ.get('RANK')} run_id={compute_run_id()} launch_id={compute_launch_id()}\n".encode())
