"""MoE routing, load balancing (aux loss and bias), capacity, metrics, and a short training run."""

import math

import pytest
import torch

from fp8train.models import MoEConfig, build_model, model_config
from fp8train.models.moe import MoE, load_balance_loss, route
from tests.models.helpers import VOCAB, moe_config


def make_moe(dim=32, **fields) -> MoE:
    base = dict(n_routed_experts=8, n_shared_experts=1, top_k=2, expert_ffn_hidden=16)
    base.update(fields)
    return MoE(dim, MoEConfig(**base))


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_normalised_gate_weights_sum_to_one(score_func):
    config = MoEConfig(8, 0, 3, 16, score_func=score_func, norm_topk_prob=True)
    logits = torch.randn(50, 8)
    _, topk_idx, topk_weight = route(logits, config)
    assert torch.allclose(topk_weight.sum(-1), torch.ones(50), atol=1e-6)
    assert torch.equal(topk_idx, logits.topk(3).indices)  # both scorings are monotone in logits


def test_unnormalised_gate_weights_are_raw_scores():
    logits = torch.randn(50, 8)
    softmax_cfg = MoEConfig(8, 0, 3, 16, score_func="softmax", norm_topk_prob=False)
    scores, topk_idx, weight = route(logits, softmax_cfg)
    assert torch.allclose(scores, logits.softmax(-1))
    assert torch.allclose(weight, logits.softmax(-1).gather(-1, topk_idx))
    assert (weight.sum(-1) < 1).all()
    sigmoid_cfg = MoEConfig(8, 0, 3, 16, score_func="sigmoid", norm_topk_prob=False)
    _, topk_idx, weight = route(logits, sigmoid_cfg)
    assert torch.allclose(weight, logits.sigmoid().gather(-1, topk_idx))


def test_bias_changes_selection_but_not_gate_weights():
    config = MoEConfig(8, 0, 2, 16, score_func="sigmoid", norm_topk_prob=False, balancing="bias")
    logits = torch.randn(20, 8)
    bias = torch.zeros(8)
    bias[5] = 10.0  # expert 5 always selected
    _, topk_idx, weight = route(logits, config, bias)
    assert (topk_idx == 5).any(dim=-1).all()
    assert torch.allclose(weight, logits.sigmoid().gather(-1, topk_idx))


def test_router_runs_in_fp32_for_bf16_input_and_under_autocast():
    moe = make_moe().to(torch.bfloat16)
    x = torch.randn(40, 32).bfloat16()
    logits = moe.router_logits(x)
    assert logits.dtype == torch.float32
    expected = x.float() @ moe.router.weight.float().T
    assert torch.allclose(logits, expected, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert moe.router_logits(x.float()).dtype == torch.float32


def test_load_balance_loss_matches_the_formula():
    scores = torch.softmax(torch.randn(1, 6, 4), dim=-1)
    topk_idx = torch.tensor([[[0], [0], [0], [1], [2], [0]]])
    fraction = torch.tensor([4, 1, 1, 0]) / 6
    expected = 4 * (fraction * scores[0].mean(0)).sum()
    assert torch.allclose(load_balance_loss(scores, topk_idx, 4, "softmax"), expected)
    uniform = torch.full((1, 6, 4), 0.25)
    assert load_balance_loss(uniform, topk_idx, 4, "softmax").item() == pytest.approx(1.0)


@pytest.mark.parametrize("scope", ["batch", "sequence"])
def test_aux_loss_gradient_reaches_router_weight(scope):
    moe = make_moe(aux_loss_coef=0.1, aux_loss_scope=scope, n_shared_experts=0)
    _, aux_loss = moe(torch.randn(2, 16, 32))
    assert aux_loss.item() > 0
    grad = torch.autograd.grad(aux_loss, moe.router.weight)[0]
    assert grad.abs().sum() > 0
    moe.eval()
    assert moe(torch.randn(2, 16, 32))[1].item() == 0.0  # evaluation: no regulariser


def test_moe_forward_matches_manual_computation():
    moe = make_moe(n_shared_experts=1)
    x = torch.randn(1, 5, 32)
    out, _ = moe(x)
    scores, topk_idx, topk_weight = route(moe.router_logits(x[0]), moe.config)
    experts = moe.experts
    manual = moe.shared_experts(x[0]).clone()
    for n in range(5):
        for j in range(moe.config.top_k):
            e = topk_idx[n, j]
            h = torch.nn.functional.silu(x[0, n] @ experts.gate_proj.weight[e].T)
            h = h * (x[0, n] @ experts.up_proj.weight[e].T)
            manual[n] += topk_weight[n, j] * (h @ experts.down_proj.weight[e].T)
    assert torch.allclose(out[0], manual, atol=1e-5)


def skewed_moe(speed: float) -> tuple[MoE, torch.Tensor]:
    """Sigmoid router whose expert 0..1 score highest for nearly every token."""
    moe = make_moe(score_func="sigmoid", balancing="bias", bias_update_speed=speed,
                   n_shared_experts=0, aux_loss_coef=0.0)
    with torch.no_grad():
        moe.router.weight.normal_(0, 0.05)
        moe.router.weight[0] += 0.03
        moe.router.weight[1] += 0.02
    x = torch.randn(4, 64, 32) * 0.5 + 1.0  # positive mean: rows 0 and 1 win
    return moe, x


def test_bias_balancing_moves_load_toward_uniform():
    moe, x = skewed_moe(speed=0.02)
    moe(x)
    skew_before = moe.last_stats["load_max_over_mean"].item()
    cv_before = moe.last_stats["load_cv"].item()
    for _ in range(20):
        moe.update_bias()
        moe(x)
    assert skew_before == 4.0  # top-2 of 8: experts 0 and 1 take every assignment
    assert moe.last_stats["load_max_over_mean"].item() < 0.6 * skew_before
    assert moe.last_stats["load_cv"].item() < 0.5 * cv_before
    assert moe.expert_bias[0] < 0 and moe.expert_bias[7] > 0
    assert int(moe.expert_load.sum()) == int(4 * 64 * 2)  # counted since the last update


def test_update_bias_follows_the_sign_rule_and_resets_counts():
    moe, x = skewed_moe(speed=0.5)
    moe(x)
    load = moe.expert_load.clone().float()
    moe.update_bias()
    assert torch.equal(moe.expert_bias, 0.5 * torch.sign(load.mean() - load))
    assert int(moe.expert_load.sum()) == 0
    moe.eval()
    moe(x)
    assert int(moe.expert_load.sum()) == 0  # evaluation does not count loads
    with pytest.raises(ValueError, match="speed"):
        moe.update_bias(speed=-1.0)


def test_expert_bias_is_fp32_state_in_the_checkpoint():
    model = build_model(moe_config({"balancing": "bias"})).to(torch.bfloat16)
    state = model.state_dict()
    assert state["layers.1.moe.expert_bias"].dtype == torch.float32
    assert "layers.1.moe.expert_load" in state


def test_capacity_factor_drops_and_reports_the_fraction():
    moe = make_moe(top_k=1, capacity_factor=1.0, n_shared_experts=0, aux_loss_coef=0.0)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[3, 0] = 10.0
    x = torch.randn(1, 64, 32)
    x[..., 0] = 1.0  # every token prefers expert 3
    out, _ = moe(x)
    capacity = math.ceil(1.0 * 64 * 1 / 8)
    assert moe.capacity(64) == capacity == 8
    assert moe.last_stats["dropped_frac"].item() == pytest.approx((64 - 8) / 64)
    assert torch.equal(out[0, 8:], torch.zeros(56, 32))  # dropped tokens got no expert output


def test_model_metrics_report_load_drop_and_aux():
    config = moe_config({"capacity_factor": 1.0, "top_k": 2}, n_layers=3)
    model = build_model(config)
    ids = torch.randint(0, VOCAB, (2, 32))
    loss = model(ids, labels=ids)
    metrics = model.last_metrics
    for key in ("moe/load_max_over_mean", "moe/dropped_frac", "moe/aux_loss",
                "moe/layer1/load_entropy", "moe/layer2/load_cv", "moe/layer2/dropped_frac"):
        assert isinstance(metrics[key], float), key
    assert "moe/layer0/load_entropy" not in metrics  # first_k_dense=1: layer 0 is dense
    assert metrics["moe/load_max_over_mean"] >= 1.0
    assert 0.0 <= metrics["moe/dropped_frac"] < 1.0
    assert 0.0 < metrics["moe/layer1/load_entropy"] <= 1.0
    model.eval()
    ce_only = model(ids, labels=ids)
    assert loss.item() == pytest.approx(ce_only.item() + metrics["moe/aux_loss"], abs=1e-5)


@pytest.mark.parametrize("field, value", [
    ("top_k", 9), ("top_k", 0), ("n_routed_experts", 0), ("n_shared_experts", -1),
    ("expert_ffn_hidden", 0), ("score_func", "relu"), ("balancing", "loss"),
    ("aux_loss_coef", -0.1), ("capacity_factor", 0.0), ("first_k_dense", -1),
    ("aux_loss_scope", "token"), ("norm_topk_prob", 1), ("bias_update_speed", -1e-3),
])
def test_moe_config_validation_names_the_field(field, value):
    fields = dict(n_routed_experts=8, n_shared_experts=1, top_k=2, expert_ffn_hidden=16)
    fields[field] = value
    with pytest.raises(ValueError, match=field):
        MoEConfig(**fields)


def test_bad_choice_lists_allowed_values():
    with pytest.raises(ValueError, match=r"\['softmax', 'sigmoid'\]"):
        MoEConfig(8, 1, 2, 16, score_func="tanh")


def test_tiny_moe_trains_on_a_repeated_batch():
    config = model_config("moe_tiny", vocab_size=VOCAB, max_seq_len=32)
    model = build_model(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.randint(0, VOCAB, (4, 32))
    losses = []
    for _ in range(30):
        loss = model(ids, labels=torch.roll(ids, -1, dims=1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        model.update_moe_bias()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    assert model.layers[1].moe.expert_bias.abs().sum() > 0  # bias balancing was active
