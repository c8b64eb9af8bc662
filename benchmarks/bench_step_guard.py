"""What the step guard costs per optimizer step (fp8train/train/step_guard.py).

    python benchmarks/bench_step_guard.py [--sizes 125m,1b] [--recipes bf16,hybrid] [--steps 20]
    python benchmarks/bench_step_guard.py --sizes tiny --seq-len 64 --steps 3   # CPU smoke run

The guard runs every step: a copy of the persistent buffers (FP8 amax histories, scales), a
max|grad| per parameter per micro-batch (a hook), one all-reduce + host sync of the loss and
FP8-buffer finiteness before the optimizer step, and a finiteness check of the gradients the
optimizer applies. This times a plain torch training step (bf16 parameters, fused AdamW on CUDA,
no DeepSpeed) with and without the guard, on the same model and batches, synchronising at the end
of every step in both (the trainer logs, and so syncs, every step anyway). Prints the median ms
per step of each and the overhead; never asserts on time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import print_table  # noqa: E402
from fp8train import models, numerics  # noqa: E402
from fp8train.train.step_guard import StepGuard  # noqa: E402

VOCAB = 32768


def build(size: str, recipe: str, seq_len: int, device: torch.device, guarded: bool):
    torch.manual_seed(0)
    model = models.build_model(models.model_config(size, VOCAB, seq_len))
    numerics.convert_to_fp8(model, numerics.load_recipe(recipe))
    model.to(device=device, dtype=torch.bfloat16)
    guard = StepGuard(model, device) if guarded else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    if guard is not None:
        optimizer.register_step_pre_hook(guard.optimizer_pre_hook)
    return model, optimizer, guard


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(model, optimizer, guard, batches, steps: int, device) -> float:
    """Median seconds per optimizer step (the first two steps are warm-up)."""
    times = []
    for step in range(steps + 2):
        sync(device)
        started = time.perf_counter()
        if guard is not None:
            guard.begin_step()
        losses = []
        for input_ids, labels in batches:
            loss = model(input_ids, labels)
            loss.backward()
            losses.append(loss.detach())
        if guard is not None:
            guard.before_boundary(losses)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        report = guard.after_step(step, losses, None) if guard is not None else None
        if report is None:
            numerics.after_optimizer_step(model)
        sync(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times[2:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="125m,1b")
    parser.add_argument("--recipes", default="bf16,hybrid")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--accum", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    generator = torch.Generator().manual_seed(0)
    batches = [tuple(t.to(device) for t in torch.randint(0, VOCAB, (2, args.micro_batch, args.seq_len),
                                                          generator=generator))
               for _ in range(args.accum)]
    rows, results = [], []
    for size in args.sizes.split(","):
        for recipe in args.recipes.split(","):
            plain = time_steps(*build(size, recipe, args.seq_len, device, False), batches, args.steps, device)
            guarded = time_steps(*build(size, recipe, args.seq_len, device, True), batches, args.steps, device)
            rows.append({"model": size, "recipe": recipe, "micro x accum": f"{args.micro_batch} x {args.accum}",
                         "plain ms/step": f"{plain * 1e3:.1f}", "guarded ms/step": f"{guarded * 1e3:.1f}",
                         "overhead %": f"{100 * (guarded - plain) / plain:+.2f}"})
            results.append({"size": size, "recipe": recipe, "plain_s": plain, "guarded_s": guarded})
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"step guard overhead on {name} (seq {args.seq_len}, median of {args.steps} steps)")
    print_table(rows, ["model", "recipe", "micro x accum", "plain ms/step", "guarded ms/step", "overhead %"])
    if args.json:
        args.json.write_text(json.dumps({"device": name, "args": vars(args) | {"json": str(args.json)},
                                         "results": results}, indent=1))


if __name__ == "__main__":
    main()
