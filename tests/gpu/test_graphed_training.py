"""On an FP8 GPU: the trainer with its compiled blocks replayed as CUDA graphs
(trainer.compile_mode=reduce-overhead) trains exactly as the plain compiled trainer does.

What could go wrong, and why this catches it: a replayed graph reads its inputs (weights, amax
histories, scales) at the addresses recorded at capture. A buffer that moves after capture (the
delayed-scaling bank re-points every caster's buffers into flat tensors), or a weight gradient that
autograd keeps in the graph's memory pool, changes the losses or fails the run. Two real training
runs through launch/train.py, 8 steps with an evaluation in the middle, must report the same losses
and gradient norms."""

import pytest

from fp8train.numerics import fp8_gemm_capability
from tests.train.helpers import check_ok, launch, metrics

ok, why = fp8_gemm_capability()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not ok, reason=why)]

STEPS = 8


def _run(tmp_path, name: str, recipe: str, *extra: str) -> dict[int, dict]:
    run_dir = tmp_path / name
    check_ok(launch(run_dir, f"+recipe={recipe}", "trainer.device=cuda", "trainer.compile=true",
                    f"trainer.max_steps={STEPS}", "trainer.eval_every=4",
                    "trainer.precision_policy=off", *extra, timeout=900))
    return metrics(run_dir)


@pytest.mark.parametrize("recipe, extra", [
    ("hybrid", ()), ("current", ()),
    ("hybrid", ("trainer.compile_scope=model",)),  # one graph for the whole model
    ("hybrid", ("model.size=moe_tiny",)),  # grouped FP8 experts, group sizes on the device
], ids=["hybrid", "current", "hybrid-whole-model", "hybrid-moe"])
def test_graphed_steps_train_as_the_compiled_trainer(tmp_path, recipe, extra):
    plain = _run(tmp_path, "plain", recipe, *extra)
    graphed = _run(tmp_path, "graphed", recipe, "trainer.compile_mode=reduce-overhead", *extra)
    for step in range(1, STEPS + 1):
        for key in ("train/loss", "train/grad_norm"):
            a, b = plain[step][key], graphed[step][key]
            print(f"{recipe} step {step} {key}: compiled {a:.6f} graphed {b:.6f}")
            assert b == pytest.approx(a, rel=1e-4, abs=1e-6), (step, key)
    val = [(s, r["val/loss"]) for s, r in plain.items() if "val/loss" in r]
    val_graphed = [(s, r["val/loss"]) for s, r in graphed.items() if "val/loss" in r]
    assert val and [s for s, _ in val] == [s for s, _ in val_graphed]
    for (_, a), (_, b) in zip(val, val_graphed):
        assert b == pytest.approx(a, rel=1e-4)
