"""Run by test_deepspeed_skip.py in a fresh interpreter (it starts a one-rank process group):
for each DeepSpeed configuration, train the tiny model on batches (1, 2, 3) with a NaN loss at
step 2 under the step guard, and on batches (1, 3) without; print whether weights, optimizer
state and FP8 buffers match bit for bit, and whether the bad step left the weights untouched.

    python tests/train/deepspeed_skip_worker.py bf16:1 bf16:2 fp32:0
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from fp8train import models, numerics  # noqa: E402
from fp8train.train import distributed  # noqa: E402
from fp8train.train.engine import build_engine, deepspeed_config  # noqa: E402
from fp8train.train.schema import DeepSpeedConfig, OptimConfig, Precision  # noqa: E402
from fp8train.train.step_guard import StepGuard  # noqa: E402

VOCAB, SEQ = 64, 16


def batch(index: int) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(0, VOCAB, (4, SEQ + 1), generator=torch.Generator().manual_seed(index))
    return tokens[:, :-1], tokens[:, 1:]


def state(engine) -> dict[str, torch.Tensor]:
    """Module parameters and buffers, plus every tensor of the client optimizer's state."""
    out = {f"module.{k}": v.detach().clone().float() for k, v in engine.module.state_dict().items()}
    for i, per_param in enumerate(engine.client_optimizer.state.values()):
        out.update({f"optim.{i}.{k}": torch.as_tensor(v).clone().float() for k, v in per_param.items()})
    return out


def train(precision: str, stage: int, batches, nan_at: int | None):
    torch.manual_seed(0)
    model = models.build_model(models.model_config("tiny", VOCAB, SEQ))
    numerics.convert_to_fp8(model, numerics.load_recipe("v3_fp8"))
    guard = StepGuard(model, torch.device("cpu"))
    ds, _ = deepspeed_config(DeepSpeedConfig(precision=Precision(precision), zero_stage=stage), 4, 1)
    optim = OptimConfig(lr=1e-2, warmup_steps=0, min_lr_ratio=1.0)  # constant LR: skipped steps moving it on do not matter
    engine = build_engine(model, optim, ds, 10, torch.device("cpu"), guard.optimizer_pre_hook)
    untouched = None
    for step, index in enumerate(batches, start=1):
        guard.begin_step()
        before = state(engine) if step == nan_at else None
        input_ids, labels = batch(index)
        loss = engine(input_ids, labels)
        loss = loss * float("nan") if step == nan_at else loss
        engine.backward(loss)
        guard.before_boundary([loss.detach()])
        engine.step()
        report = guard.after_step(step, [loss.detach()], engine.get_global_grad_norm())
        if report is None:
            numerics.after_optimizer_step(model)
        else:
            numerics.invalidate_weight_caches(model)
        if before is not None:
            after = state(engine)
            untouched = report is not None and all(torch.equal(before[k], after[k]) for k in before)
    return state(engine), untouched


def main() -> None:
    distributed.init_distributed(torch.device("cpu"), 60)
    results = {}
    for spec in sys.argv[1:]:
        precision, stage = spec.split(":")
        skipped, untouched = train(precision, int(stage), (1, 2, 3), nan_at=2)
        clean, _ = train(precision, int(stage), (1, 3), nan_at=None)
        differing = [k for k in clean if not torch.equal(clean[k], skipped[k])]
        results[spec] = {"untouched": untouched, "differing": differing[:5]}
    print("RESULTS " + json.dumps(results))


if __name__ == "__main__":
    main()
