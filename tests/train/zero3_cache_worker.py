"""Run by test_zero3_weight_cache.py under torchrun (2 gloo ranks): the tiny model with hybrid FP8
layers through DeepSpeed, 2 micro-batches per optimizer step, 3 steps, once per mode:

    zero3           ZeRO-3, every parameter partitioned (persistence threshold 0, so every FP8
                    weight is all-gathered into a new buffer before each forward and freed after)
    zero3_uncached  the same with the FP8 weight cache off (a cast at every forward: the reference)
    zero1           ZeRO-1

Prints one line `RESULTS {json}`: per mode the loss of every micro-batch, the weight casts of
every FP8 layer in every step (counted by wrapping the weight caster, independently of the layer's
own counter), and how often the FP8 weight a forward uses was compared, with the weight gathered,
with a fresh cast of the weight then in the module (and how often they differed: a stale cache).

    torchrun --standalone --nproc_per_node=2 tests/train/zero3_cache_worker.py
"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from fp8train import models, numerics  # noqa: E402
from fp8train.train import distributed  # noqa: E402
from fp8train.train.engine import build_engine, deepspeed_config  # noqa: E402
from fp8train.train.schema import DeepSpeedConfig, OptimConfig  # noqa: E402

VOCAB, SEQ, MICRO, ACCUM, STEPS = 64, 16, 2, 2, 3


def batch(step: int, micro: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    seed = 1000 * step + 10 * micro + rank
    tokens = torch.randint(0, VOCAB, (MICRO, SEQ + 1), generator=torch.Generator().manual_seed(seed))
    return tokens[:, :-1], tokens[:, 1:]


def count_casts(layer, counts: list[int]) -> None:
    cast = layer.weight_caster.cast

    def counting(*args, **kwargs):
        counts[0] += 1
        return cast(*args, **kwargs)

    layer.weight_caster.cast = counting


def stale_check(checks: list[int]):
    """Forward pre-hook, after DeepSpeed's (the weight is gathered): the FP8 weight this forward
    will use (the layer's cache, filled here on a miss) must equal a fresh cast of the weight now
    in the module (recast: the same scale, nothing recorded)."""
    def hook(layer, _args):
        used, _ = layer.fp8_weight()
        fresh, _ = layer.weight_caster.recast(layer.weight.detach(), need_cols=False)
        checks[0] += 1
        checks[1] += not (torch.equal(used.data.view(torch.uint8), fresh.data.view(torch.uint8))
                          and torch.equal(used.scale_inv, fresh.scale_inv))
    return hook


def train(mode: str, rank: int) -> dict:
    torch.manual_seed(0)
    model = models.build_model(models.model_config("tiny", VOCAB, SEQ))
    numerics.convert_to_fp8(model, numerics.load_recipe("hybrid"))
    layers = [m for m in model.modules() if isinstance(m, numerics.FP8Linear)]
    counts = [[0] for _ in layers]
    checks = [0, 0]
    for layer, count in zip(layers, counts):
        count_casts(layer, count)
        layer.cache_weight = mode != "zero3_uncached"
    ds, _ = deepspeed_config(DeepSpeedConfig(zero_stage=1 if mode == "zero1" else 3), MICRO, ACCUM)
    if mode != "zero1":
        ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # gather every weight
    optim = OptimConfig(lr=1e-2, warmup_steps=0, min_lr_ratio=1.0)
    engine = build_engine(model, optim, ds, 10, torch.device("cpu"))
    for layer in layers if mode != "zero3_uncached" else ():  # after DeepSpeed's hook: weight gathered
        layer.register_forward_pre_hook(stale_check(checks))
    losses, casts = [], []
    for step in range(STEPS):
        before = [c[0] for c in counts]
        for micro in range(ACCUM):
            loss = engine(*batch(step, micro, rank))
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
        numerics.after_optimizer_step(model)
        casts.append([c[0] - b for c, b in zip(counts, before)])
    return {"losses": losses, "casts": casts, "stale_checks": checks[0], "stale": checks[1]}


def main() -> None:
    info = distributed.init_distributed(torch.device("cpu"), 120)
    results = {mode: train(mode, info.rank) for mode in ("zero3", "zero3_uncached", "zero1")}
    if info.is_main:
        print("RESULTS " + json.dumps(results), flush=True)
    # Three DeepSpeed engines in one process: under load a rank sometimes aborted in interpreter
    # teardown ("terminate called without an active exception") after its work was done. The
    # results are out; leave with an explicit barrier, group teardown and a plain exit.
    distributed.barrier()
    torch.distributed.destroy_process_group()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
