"""launch/train.py, unchanged, plus two benchmark-only instruments (run under torchrun).

    torchrun --standalone --nproc_per_node=4 benchmarks/scaling_worker.py +experiment=gpu_1b \\
        +recipe=hybrid hydra.run.dir=runs/bench_x

bench_scaling.py starts every run through this file instead of launch/train.py, so a run is the
real trainer with the real config, except that:

1. The FP8 amax all-reduce is timed from outside the numerics code: the delayed-scaling bank's
   `all_reduce_current_amax` (the one place the per-step MAX all-reduce of every amax happens,
   fp8train/numerics/delayed_bank.py) is wrapped with CUDA events (perf_counter on a CPU), and the
   torch.distributed.all_reduce calls inside it are counted, so "one fused collective per step"
   is measured, not assumed. Each rank writes <run_dir>/amax_allreduce.rank<R>.json at exit:
   {"ms": [per call], "collectives": [per call]}. A recipe without delayed scaling (bf16,
   blockwise) never calls it, and a one-rank run returns before any collective.
2. The end-of-run checkpoint is skipped: a 1B run would otherwise write ~11 GB of optimizer
   state per run, which costs more than the run's timed steps. Nothing else changes.

The numerics code is left untouched (it is being refactored); if the wrapped names move, this
fails loudly at start-up instead of reporting zeros.
"""

from __future__ import annotations

import atexit
import json
import os
import runpy
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402


def _run_dir(argv: list[str]) -> Path:
    dirs = [a.split("=", 1)[1] for a in argv if a.startswith("hydra.run.dir=")]
    if not dirs:
        raise SystemExit("scaling_worker.py: pass hydra.run.dir=DIR (the timings are written there)")
    return Path(dirs[-1])


class AmaxAllReduceTimer:
    """Wraps DelayedScalingBank.all_reduce_current_amax; one record per call."""

    def __init__(self):
        self.events: list[tuple] = []  # (start event or t0, end event or t1, collectives)

    def install(self) -> None:
        from fp8train.numerics import delayed_bank as state_bank

        bank = getattr(state_bank, "DelayedScalingBank", None)
        original = getattr(bank, "all_reduce_current_amax", None)
        if original is None:
            raise SystemExit("scaling_worker.py: fp8train.numerics.delayed_bank.DelayedScalingBank."
                             "all_reduce_current_amax is gone; update the amax timer to the new name")
        timer = self

        def timed(bank_self, process_group=None):
            real, calls = dist.all_reduce, [0]

            def counting(*args, **kwargs):
                calls[0] += 1
                return real(*args, **kwargs)

            if bank_self.groups[0].history.is_cuda:  # GPU time on the current stream
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
            else:
                start, end = time.perf_counter(), None
            dist.all_reduce = counting
            try:
                original(bank_self, process_group)
            finally:
                dist.all_reduce = real
            if end is not None:
                end.record()
            timer.events.append((start, end if end is not None else time.perf_counter(), calls[0]))

        bank.all_reduce_current_amax = timed

    def write(self, run_dir: Path) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        ms = [a.elapsed_time(b) if isinstance(a, torch.cuda.Event) else (b - a) * 1e3
              for a, b, _ in self.events]
        rank = int(os.environ.get("RANK", 0))
        record = {"ms": ms, "collectives": [c for _, _, c in self.events]}
        (run_dir / f"amax_allreduce.rank{rank}.json").write_text(json.dumps(record))


def skip_final_checkpoint() -> None:
    from fp8train.train import trainer

    if not hasattr(trainer.Trainer, "save"):
        raise SystemExit("scaling_worker.py: Trainer.save is gone; update skip_final_checkpoint")

    def no_save(self):
        self.logger.info("benchmark: checkpoint skipped (benchmarks/scaling_worker.py)")

    trainer.Trainer.save = no_save


def main() -> None:
    argv = sys.argv[1:]
    run_dir = _run_dir(argv)
    timer = AmaxAllReduceTimer()
    timer.install()
    skip_final_checkpoint()
    atexit.register(lambda: run_dir.is_dir() and timer.write(run_dir))
    train = REPO / "launch" / "train.py"
    sys.argv = [str(train), *argv]
    runpy.run_path(str(train), run_name="__main__")


if __name__ == "__main__":
    main()
