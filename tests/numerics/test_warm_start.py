"""The delayed-scaling warm start: the first step's gradients are right, and the pass changes nothing else.

With every scale at 1, the first backward flushes small gradients. The card's v3_fp8 recipe carries
gradients in E4M3, whose smallest subnormal is 2^-9. The test scales the loss down (as a
large model's per-element gradients are small) so that the flush is unmistakable. It compares the
first step's weight gradients with an FP32 copy of the same model, with and without the warm start.
"""

from __future__ import annotations

import copy

import pytest
import torch

from fp8train import models
from fp8train.numerics import convert_to_fp8, load_recipe, warm_start_delayed_scales
from fp8train.numerics.step_update import delayed_casters

VOCAB, SEQ, BATCH = 64, 32, 4
LOSS_SCALE = 1e-3  # per-element gradients of ~1e-5..1e-4, as in a large model


def _batch(seed: int = 1):
    ids = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(seed))
    return ids[:, :-1], ids[:, 1:]


def _models(recipe: str):
    torch.manual_seed(0)
    reference = models.build_model(models.model_config("tiny", VOCAB, SEQ, n_layers=2))
    fp8 = copy.deepcopy(reference)
    convert_to_fp8(fp8, load_recipe(recipe), backend="emulated")
    return reference, fp8


def _grads(model, batch) -> dict[str, torch.Tensor]:
    (model(*batch) * LOSS_SCALE).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def _warm(model, batch) -> int:
    return warm_start_delayed_scales(model, lambda: model(*batch) * LOSS_SCALE, model.layers[0])


def _relative_error(grads, reference) -> float:
    names = [n for n in reference if n.startswith("layers.") and n.endswith("weight") and reference[n].dim() == 2]
    num = sum(float((grads[n] - reference[n]).double().norm() ** 2) for n in names)
    den = sum(float(reference[n].double().norm() ** 2) for n in names)
    return (num / den) ** 0.5


@pytest.mark.parametrize("recipe", ["v3_fp8", "hybrid"])
def test_warm_start_fixes_the_first_steps_gradients(recipe):
    batch = _batch()
    reference, cold = _models(recipe)
    _, warm = _models(recipe)
    expected = _grads(reference, batch)
    cold_error = _relative_error(_grads(cold, batch), expected)
    weights = {n: p.detach().clone() for n, p in warm.named_parameters()}
    assert _warm(warm, _batch(seed=2)) == len(delayed_casters(warm)) > 0  # another batch, as the trainer's
    assert all(p.grad is None for p in warm.parameters()), "the pass accumulated into .grad"
    assert all(torch.equal(p, weights[n]) for n, p in warm.named_parameters()), "the pass moved a weight"
    assert all(not c.warm_start for c in delayed_casters(warm)), "casters left in warm-start mode"
    warm_error = _relative_error(_grads(warm, batch), expected)
    assert warm_error < 0.15, f"warm-started first-step gradients off by {warm_error:.3f}"
    assert warm_error < cold_error / 3, f"cold {cold_error:.3f}, warm {warm_error:.3f}"


def test_warm_start_scales_come_from_the_pass():
    """After the pass each delayed scale is fmax / amax over the pass (margin 0): the scale of a
    current-scaled cast of the same tensor, as the recipe's update rule gives for one history entry."""
    reference, warm = _models("v3_fp8")
    _warm(warm, _batch())
    for caster in delayed_casters(warm):
        amax = caster.amax_history.max()
        assert amax > 0, f"{caster.role}: no amax recorded"
        assert torch.allclose(caster.scale, caster.fmt.max / amax, rtol=1e-6), caster.role


def test_no_delayed_casters_no_pass():
    _, model = _models("current")
    called = []
    assert warm_start_delayed_scales(model, lambda: called.append(1), model.layers[0]) == 0
    assert not called


def test_warm_start_restores_every_other_buffer():
    """A MoE model counts expert loads for its bias balancing in every training forward; the pass is
    not a training step, so those counters (and every buffer but the FP8 state) come back as they were."""
    torch.manual_seed(0)
    config = models.model_config("moe_tiny", VOCAB, SEQ, moe={"balancing": "bias"})
    model = models.build_model(config)
    convert_to_fp8(model, load_recipe("hybrid"), backend="emulated")
    fp8_state = {id(b) for c in delayed_casters(model) for b in c.buffers()}
    before = {n: b.clone() for n, b in model.named_buffers() if id(b) not in fp8_state}
    assert any("expert_load" in n for n in before)
    _warm(model, _batch())
    for name, buf in model.named_buffers():
        if name in before:
            assert torch.equal(buf, before[name]), f"{name} changed"


def test_a_block_the_forward_never_runs_is_a_clear_error():
    _, model = _models("hybrid")
    with pytest.raises(ValueError, match="never ran first_block"):
        warm_start_delayed_scales(model, lambda: model(*_batch()), torch.nn.Linear(2, 2))
    assert all(not c.warm_start for c in delayed_casters(model)), "casters left in warm-start mode"
