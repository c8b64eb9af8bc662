"""A small MoE model trained with the native FP8 path and with Transformer Engine tracks one loss curve.

Same initial weights, same batches (the embedded corpus), same recipe (TE's delayed HYBRID), AdamW:
one copy converted with backend=scaled_mm (our grouped function for the experts, FP8Linear for
attention and the shared expert), one with backend=te (te.GroupedLinear / te.Linear). An
unconverted copy (FP32 parameters and activations) shows what the unquantized model does. The curves (moving averages) must
stay within a few percent of each other at every logged step and both must learn.
"""

import copy

import pytest
import torch

from fp8train.data import TokenFile, TrainBatches, ensure_default_corpus
from fp8train.models import build_model, model_config
from fp8train.numerics import after_optimizer_step, convert_to_fp8, load_recipe
from fp8train.numerics.te_backend import te_available

ok, why = te_available()
pytestmark = [pytest.mark.gpu, pytest.mark.te, pytest.mark.skipif(not ok, reason=why)]

STEPS, SEQ, BATCH, WINDOW = 120, 256, 16, 10


def _train(model, batches, steps: int) -> list[float]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    losses = []
    for step in range(steps):
        input_ids, labels = (t.cuda() for t in batches.get(step, 0))
        loss = model(input_ids, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        after_optimizer_step(model)
        losses.append(loss.item())
    return losses


def _smooth(values: list[float]) -> list[float]:
    return [sum(values[max(0, i - WINDOW + 1):i + 1]) / len(values[max(0, i - WINDOW + 1):i + 1])
            for i in range(len(values))]


def test_small_moe_native_and_te_track_the_same_loss_curve():
    tokens = TokenFile(ensure_default_corpus(), "train")
    batches = TrainBatches(tokens, seq_len=SEQ, micro_batch_size=BATCH, grad_accum_steps=1,
                           rank=0, world_size=1, seed=0)
    torch.manual_seed(0)
    base = build_model(model_config("moe_small", tokens.vocab_size, SEQ)).cuda()
    runs = {"fp32": copy.deepcopy(base)}
    recipe = load_recipe("hybrid")
    for backend in ("scaled_mm", "te"):
        model = copy.deepcopy(base)
        report = convert_to_fp8(model, recipe, backend=backend)
        assert report.converted, f"backend {backend}: nothing converted"
        runs[backend] = model
    curves = {name: _smooth(_train(model, batches, STEPS)) for name, model in runs.items()}
    for step in range(0, STEPS, 20):
        print(f"step {step:4d} " + "  ".join(f"{n} {c[step]:.4f}" for n, c in curves.items()))
    print("final", {n: round(c[-1], 4) for n, c in curves.items()})
    for name, curve in curves.items():
        assert curve[-1] < 0.6 * curve[0], f"{name} did not learn: {curve[0]:.3f} -> {curve[-1]:.3f}"
    gaps = [abs(a - b) / b for a, b in zip(curves["scaled_mm"][WINDOW:], curves["te"][WINDOW:])]
    print(f"max relative gap native vs TE after step {WINDOW}: {max(gaps):.4f}")
    assert max(gaps) < 0.05, "native FP8 and TE FP8 loss curves drifted apart"
