"""A small MoE model trained with the native FP8 path tracks the unquantized loss curve (and TE's).

Same initial weights, same batches (the embedded corpus), AdamW. The native copies are converted
with backend=scaled_mm (the grouped FP8 experts: one Triton GEMM per pass for all experts, tokens
cast before dispatch; FP8Linear for attention and the shared expert) with the hybrid (delayed,
E4M3/E5M2) and blockwise recipes; an unconverted copy (FP32 parameters and activations) is the
reference. With Transformer Engine installed, a backend=te copy (te.GroupedLinear / te.Linear,
HYBRID) must track the native hybrid one. The curves (moving averages) must stay within a few
percent of each other at every logged step and all must learn.
"""

import copy

import pytest
import torch

from fp8train.data import TokenFile, TrainBatches, ensure_default_corpus
from fp8train.models import build_model, model_config
from fp8train.numerics import after_optimizer_step, convert_to_fp8, fp8_gemm_capability, load_recipe
from fp8train.numerics.te_backend import te_available

ok, why = fp8_gemm_capability()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not ok, reason=why)]
te_ok, te_why = te_available()

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


def _curves(backends: dict[str, tuple[str, str]]) -> dict[str, list[float]]:
    """{name: smoothed loss curve} for an unconverted copy ("fp32") and each (recipe, backend)."""
    tokens = TokenFile(ensure_default_corpus(), "train")
    batches = TrainBatches(tokens, seq_len=SEQ, micro_batch_size=BATCH, grad_accum_steps=1,
                           rank=0, world_size=1, seed=0)
    torch.manual_seed(0)
    base = build_model(model_config("moe_small", tokens.vocab_size, SEQ)).cuda()
    runs = {"fp32": copy.deepcopy(base)}
    for name, (recipe_name, backend) in backends.items():
        model = copy.deepcopy(base)
        report = convert_to_fp8(model, load_recipe(recipe_name), backend=backend)
        assert report.converted, f"{name}: nothing converted"
        runs[name] = model
    curves = {name: _smooth(_train(model, batches, STEPS)) for name, model in runs.items()}
    for step in range(0, STEPS, 20):
        print(f"step {step:4d} " + "  ".join(f"{n} {c[step]:.4f}" for n, c in curves.items()))
    print("final", {n: round(c[-1], 4) for n, c in curves.items()})
    for name, curve in curves.items():
        assert curve[-1] < 0.6 * curve[0], f"{name} did not learn: {curve[0]:.3f} -> {curve[-1]:.3f}"
    return curves


def _max_gap(curve, reference) -> float:
    return max(abs(a - b) / b for a, b in zip(curve[WINDOW:], reference[WINDOW:]))


def test_small_moe_native_fp8_tracks_the_unquantized_curve():
    curves = _curves({"hybrid": ("hybrid", "scaled_mm"), "blockwise": ("blockwise", "scaled_mm")})
    for name in ("hybrid", "blockwise"):
        gap = _max_gap(curves[name], curves["fp32"])
        print(f"max relative gap native {name} vs unquantized after step {WINDOW}: {gap:.4f}")
        assert gap < 0.05, f"native {name} FP8 drifted from the unquantized loss curve"


@pytest.mark.te
@pytest.mark.skipif(not te_ok, reason=te_why)
def test_small_moe_native_and_te_track_the_same_loss_curve():
    curves = _curves({"scaled_mm": ("hybrid", "scaled_mm"), "te": ("hybrid", "te")})
    gap = _max_gap(curves["scaled_mm"], curves["te"])
    print(f"max relative gap native vs TE after step {WINDOW}: {gap:.4f}")
    assert gap < 0.05, "native FP8 and TE FP8 loss curves drifted apart"
