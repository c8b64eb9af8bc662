"""A non-finite step leaves no trace: weights, optimizer moments and FP8 scales end where a run that
never saw the bad batch ends, bit for bit; the report names what went non-finite; the policy
counts bad steps in a row and decides."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fp8train.numerics import after_optimizer_step, convert_to_fp8, invalidate_weight_caches, load_recipe
from fp8train.train.checkpoint import CheckpointRef
from fp8train.train.divergence import DivergencePolicy, Verdict
from fp8train.train.schema import OnDivergence
from fp8train.train.step_guard import StepGuard, StepReport, nonfinite_state, sync_lr_schedule

CPU = torch.device("cpu")


def fp8_model(fp8: bool = True) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16))
    if fp8:
        convert_to_fp8(model, load_recipe("v3_fp8"), backend="emulated")
    return model


def batch(index: int) -> torch.Tensor:
    return torch.randn(8, 32, generator=torch.Generator().manual_seed(index))


def _nan_gradient(module, inputs, output):
    output.register_hook(lambda grad: grad * float("nan"))


def train(batches, poison: dict[int, str], fp8: bool = True) -> tuple[nn.Module, torch.optim.Optimizer, list]:
    """One optimizer step per batch; poison[step] = 'loss' (NaN loss), 'input' (an inf input
    element) or 'grad' (NaN gradients below the ReLU, the loss stays finite)."""
    model = fp8_model(fp8)
    guard = StepGuard(model, CPU)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    optimizer.register_step_pre_hook(guard.optimizer_pre_hook)
    reports = []
    for step, index in enumerate(batches, start=1):
        guard.begin_step()
        x = batch(index)
        if poison.get(step) == "input":
            x[0, 0] = float("inf")
        loss = model(x).square().mean()
        loss = loss * float("nan") if poison.get(step) == "loss" else loss
        if poison.get(step) == "grad":  # must be the last step: the hook stays
            handle = model[1].register_forward_hook(_nan_gradient)
            loss = model(x).square().mean()
            handle.remove()
        loss.backward()
        guard.before_boundary([loss.detach()])
        optimizer.step()
        optimizer.zero_grad()
        report = guard.after_step(step, [loss.detach()], None)
        if report is None:  # as the trainer does
            after_optimizer_step(model)
        else:  # the next forward re-casts the (unchanged) weights and records their amax again
            invalidate_weight_caches(model)
        reports.append(report)
    return model, optimizer, reports


def assert_same_state(a: tuple, b: tuple) -> None:
    (model_a, opt_a, _), (model_b, opt_b, _) = a, b
    for (name, x), y in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        assert torch.equal(x, y), name
    for state_a, state_b in zip(opt_a.state.values(), opt_b.state.values()):
        for key in state_a:
            assert torch.equal(torch.as_tensor(state_a[key]), torch.as_tensor(state_b[key])), key


@pytest.mark.parametrize("poison", ["loss", "input"])
def test_a_bad_step_leaves_no_trace(poison):
    """Batches 1, 2, 3 with step 2 poisoned end exactly where batches 1, 3 end."""
    skipped = train([1, 2, 3], {2: poison})
    assert_same_state(skipped, train([1, 3], {}))
    report = skipped[2][1]
    assert report is not None and report.step == 2 and skipped[2][0] is None is skipped[2][2]
    if poison == "input":  # saturated in the FP8 cast: loss and gradients finite, the amax not
        assert report.buffers == ["0.input_caster"] and not report.grads and not report.loss_nonfinite
    else:
        assert report.loss_nonfinite and "2.weight" in report.grads
    assert not report.weights
    assert "step 2 was not applied" in report.describe()


def test_a_non_finite_gradient_with_a_finite_loss_is_vetoed_by_the_optimizer_hook():
    model, _, reports = train([1, 2], {2: "grad"}, fp8=False)
    report = reports[1]
    assert report is not None and not report.loss_nonfinite and report.grads == ["0.weight", "0.bias"]
    reference, _, _ = train([1], {}, fp8=False)
    for (name, x), y in zip(model.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(x, y), name


def test_nonfinite_state_names_weights_and_fp8_buffers():
    model = fp8_model()
    assert nonfinite_state(model, CPU) == []
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
        model[2].grad_output_caster.amax_history[3] = float("inf")
    assert nonfinite_state(model, CPU) == ["0.weight", "2.grad_output_caster"]


def test_lr_schedule_moves_on_to_the_step():
    optimizer = torch.optim.AdamW([nn.Parameter(torch.ones(1))], lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (s + 1))
    sync_lr_schedule(scheduler, 3)
    assert scheduler.last_epoch == 3 and optimizer.param_groups[0]["lr"] == pytest.approx(0.25)
    sync_lr_schedule(scheduler, 2)  # never backwards
    assert scheduler.last_epoch == 3


def bad(step: int, overflow: bool = False) -> StepReport:
    return StepReport(step, float("nan"), None, True, loss_scale_overflow=overflow)


@pytest.mark.parametrize("mode,expected", [
    (OnDivergence.stop, [Verdict.STOP]),
    (OnDivergence.skip, [Verdict.CONTINUE, Verdict.CONTINUE, Verdict.STOP]),
    (OnDivergence.rollback, [Verdict.CONTINUE, Verdict.CONTINUE, Verdict.ROLLBACK]),
])
def test_policy_counts_bad_steps_in_a_row(mode, expected, tmp_path):
    policy = DivergencePolicy(mode, max_bad_steps=3, max_rollbacks=1)
    assert policy.judge(bad(1)) is expected[0]
    if len(expected) == 1:
        return
    assert policy.judge(None) is Verdict.CONTINUE and policy.healthy  # a good step resets
    verdicts = [policy.judge(bad(step)) for step in (3, 4, 5)]
    assert verdicts == expected and not policy.healthy and policy.skipped == 4
    message = policy.stop_message(bad(5), tmp_path)
    assert "(3, 4, 5)" in message and "no checkpoint had been written" in message


def test_rollbacks_are_limited_and_fp16_overflow_is_not_divergence(tmp_path):
    policy = DivergencePolicy(OnDivergence.rollback, max_bad_steps=1, max_rollbacks=1)
    assert policy.judge(bad(1, overflow=True)) is Verdict.CONTINUE and policy.skipped == 0
    assert policy.judge(bad(2)) is Verdict.ROLLBACK
    event = policy.rolled_back(CheckpointRef(tmp_path, "step_0000001", {"step": 1}), step=2)
    assert event["event"] == "rollback" and event["skipped_data_steps"] == [2, 2]
    assert policy.healthy and policy.judge(bad(3)) is Verdict.STOP


class Counting(nn.Module):
    """Records per-forward statistics in a persistent buffer, as MoE load counters do."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.register_buffer("load", torch.zeros(4, dtype=torch.int64))
        self.register_buffer("table", torch.ones(3), persistent=False)  # constant: not snapshotted

    def forward(self, x):
        self.load += 1
        return self.linear(x)


def test_every_persistent_buffer_is_restored_after_a_bad_step():
    model = Counting()
    guard = StepGuard(model, CPU)
    assert [name for name, _, _ in guard.snapshot.entries] == ["load"]
    guard.begin_step()
    loss = model(torch.ones(2, 4)).sum() * float("nan")
    loss.backward()
    guard.before_boundary([loss.detach()])
    assert guard.after_step(1, [loss.detach()], None) is not None
    assert model.load.tolist() == [0, 0, 0, 0]


def test_a_tied_weight_is_not_taken_for_a_buffer():
    """A tied lm_head (lm_head.weight = embed.weight) is in the state dict twice but is a parameter:
    the snapshot took it for a buffer and every step with model.tie_embeddings=true crashed (KeyError)."""
    from fp8train.models import build_model, model_config

    model = build_model(model_config("tiny", 64, 16, tie_embeddings=True))
    guard = StepGuard(model, CPU)
    assert not any(name.endswith("weight") for name, _, _ in guard.snapshot.entries)
    guard.begin_step()
