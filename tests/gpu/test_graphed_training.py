"""On an FP8 GPU: the trainer with its compiled blocks replayed as CUDA graphs
(trainer.compile_mode=reduce-overhead) trains exactly as the plain compiled trainer does.

What could go wrong, and why this catches it: a replayed graph reads its inputs (weights, amax
histories, scales) at the addresses recorded at capture. A buffer that moves after capture (the
delayed-scaling bank re-points every caster's buffers into flat tensors), or a weight gradient that
autograd keeps in the graph's memory pool, changes the losses or fails the run. Two real training
runs through launch/train.py, 8 steps with an evaluation in the middle, must report the same losses
and gradient norms.

Both runs take the custom-operator casts (`trainer.compiled_casts=operators`, the route a graphed
run picks by default): Inductor's generated casts may fuse a cast with the op before it and skip
that op's BF16 rounding, a legitimate difference of a few 1e-4 in the loss that would hide the one
this test is about (H200, session 13: with the routes mixed all four cases failed at 1e-4; with
one route every printed digit matched, the MoE model's included)."""

import pytest

from fp8train.numerics import fp8_gemm_capability
from tests.train.helpers import check_ok, launch, metrics

ok, why = fp8_gemm_capability()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not ok, reason=why)]

STEPS = 8


def _run(tmp_path, name: str, recipe: str, *extra: str) -> dict[int, dict]:
    run_dir = tmp_path / name
    check_ok(launch(run_dir, f"+recipe={recipe}", "trainer.device=cuda", "trainer.compile=true",
                    f"trainer.max_steps={STEPS}", "trainer.eval_every=4", "trainer.compiled_casts=operators",
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
    for key in ("train/loss", "train/grad_norm"):
        for step in range(1, STEPS + 1):
            a, b = plain[step][key], graphed[step][key]
            print(f"{recipe} step {step} {key}: compiled {a:.6f} graphed {b:.6f}")
            assert b == pytest.approx(a, rel=1e-4, abs=1e-6), (step, key)
    val_steps = [s for s, r in plain.items() if "val/loss" in r]
    assert val_steps and val_steps == [s for s, r in graphed.items() if "val/loss" in r]
    for s in val_steps:
        assert graphed[s]["val/loss"] == pytest.approx(plain[s]["val/loss"], rel=1e-4), (s, "val/loss")
