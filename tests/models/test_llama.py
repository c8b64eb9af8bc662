"""Dense decoder: shapes, initial loss, causality, FP32 norm/RoPE, module names for the FP8 swap."""

import math

import pytest
import torch
from torch import nn

from fp8train.models import GroupedLinear, ModelConfig, MoEConfig, build_model
from fp8train.models.layers import RMSNorm, RotaryEmbedding, apply_rotary
from tests.models.helpers import VOCAB, dense_config, moe_config


def test_forward_backward_shapes_and_grads():
    model = build_model(dense_config())
    ids = torch.randint(0, VOCAB, (3, 17))
    logits = model(ids)
    assert logits.shape == (3, 17, VOCAB)
    loss = model(ids, labels=ids)
    assert loss.shape == () and loss.dtype == torch.float32
    loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
    assert model.last_metrics == {}


def test_initial_loss_is_log_vocab():
    model = build_model(dense_config(vocab_size=1024))
    ids = torch.randint(0, 1024, (4, 64))
    loss = model(ids, labels=torch.randint(0, 1024, (4, 64)))
    assert abs(loss.item() - math.log(1024)) < 0.1


def test_ignore_index_positions_do_not_count():
    model = build_model(dense_config())
    ids = torch.randint(0, VOCAB, (2, 8))
    labels = ids.clone()
    labels[:, 4:] = -100
    expected = model(ids[:, :4], labels=labels[:, :4])  # causal: prefix logits are identical
    assert torch.allclose(model(ids, labels=labels), expected, atol=1e-6)


@pytest.mark.parametrize("make_config", [dense_config, moe_config])
def test_future_tokens_do_not_change_earlier_logits(make_config):
    model = build_model(make_config()).eval()
    ids = torch.randint(0, VOCAB, (2, 32))
    changed = ids.clone()
    changed[:, 20:] = (changed[:, 20:] + 7) % VOCAB
    with torch.no_grad():
        before, after = model(ids), model(changed)
    assert torch.allclose(before[:, :20], after[:, :20], atol=1e-6, rtol=0)
    assert not torch.allclose(before[:, 20:], after[:, 20:])


def test_rmsnorm_computes_in_fp32_for_bf16_input():
    norm = RMSNorm(512)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(512) + 0.5)
    x = (torch.randn(4, 64, 512) * torch.logspace(-3, 3, 512)).bfloat16()
    out = norm(x)
    x32 = x.float()
    reference = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, reference.bfloat16())
    w16 = norm.weight.bfloat16()
    all_bf16 = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * w16
    assert not torch.equal(out, all_bf16)  # the test can tell FP32 math from bf16 math


def test_rope_tables_stay_fp32_and_rotation_preserves_norm():
    model = build_model(dense_config()).to(torch.bfloat16)
    assert model.rope.cos.dtype == torch.float32 and model.rope.sin.dtype == torch.float32
    assert "rope.cos" not in model.state_dict()  # recomputable: not checkpointed
    rope = RotaryEmbedding(head_dim=16, max_seq_len=8)
    cos, sin = rope(8)
    x = torch.randn(2, 8, 3, 16)
    rotated = apply_rotary(x, cos, sin)
    assert torch.allclose(rotated.norm(dim=-1), x.norm(dim=-1), atol=1e-5)
    assert torch.equal(rotated[:, 0], x[:, 0])  # position 0 is not rotated


def test_rope_relative_position_property():
    rope = RotaryEmbedding(head_dim=8, max_seq_len=16)
    cos, sin = rope(16)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
    q_all = apply_rotary(q.expand(1, 16, 1, 8), cos, sin)[0, :, 0]  # [16, 8]
    k_all = apply_rotary(k.expand(1, 16, 1, 8), cos, sin)[0, :, 0]
    assert torch.allclose(q_all[5] @ k_all[3], q_all[9] @ k_all[7], atol=1e-5)


def test_bf16_model_runs_and_returns_fp32_loss():
    model = build_model(moe_config()).to(torch.bfloat16)
    ids = torch.randint(0, VOCAB, (2, 16))
    loss = model(ids, labels=ids)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert model(ids).dtype == torch.bfloat16
    assert model.layers[1].moe.expert_bias.dtype == torch.float32
    loss.backward()


def test_tied_embeddings_share_one_tensor():
    model = build_model(dense_config(tie_embeddings=True))
    assert model.lm_head.weight is model.embed.weight


def test_sequence_longer_than_max_seq_len_is_rejected():
    model = build_model(dense_config(max_seq_len=16))
    with pytest.raises(ValueError, match="max_seq_len=16"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="labels shape"):
        model(torch.zeros(1, 8, dtype=torch.long), labels=torch.zeros(1, 7, dtype=torch.long))


def test_module_names_match_the_fp8_swap_contract():
    model = build_model(moe_config())
    skipped = {"embed", "lm_head", "router"}
    converted = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    leaf_names = {name.rsplit(".", 1)[-1]: module for name, module in model.named_modules()
                  if isinstance(module, (nn.Linear, nn.Embedding, GroupedLinear))}
    assert set(leaf_names) == skipped | converted
    grouped = [n for n, m in model.named_modules() if isinstance(m, GroupedLinear)]
    assert sorted(n.rsplit(".", 1)[-1] for n in grouped) == ["down_proj", "gate_proj", "up_proj"]
    assert all(".gate." not in n + "." for n, _ in model.named_modules())


def test_init_scales_residual_projections():
    config = dense_config(d_model=256, n_layers=8, ffn_hidden=512)
    model = build_model(config)
    std = config.init_std
    assert model.layers[0].attn.q_proj.weight.std().item() == pytest.approx(std, rel=0.05)
    expected = std / math.sqrt(2 * config.n_layers)
    assert model.layers[0].attn.o_proj.weight.std().item() == pytest.approx(expected, rel=0.05)
    assert model.layers[0].mlp.down_proj.weight.std().item() == pytest.approx(expected, rel=0.05)


@pytest.mark.parametrize("field, value", [
    ("vocab_size", 0), ("d_model", -1), ("n_heads", 3), ("n_kv_heads", 3), ("ffn_hidden", 0),
    ("max_seq_len", 0), ("norm_eps", 0.0), ("rope_theta", -1.0), ("init_std", 0),
    ("tie_embeddings", "yes"),
])
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        dense_config(**{field: value})


def test_config_rejects_odd_head_dim_and_bad_moe():
    with pytest.raises(ValueError, match="head_dim"):
        dense_config(d_model=60, n_heads=4, n_kv_heads=4)
    with pytest.raises(ValueError, match="first_k_dense"):
        moe_config({"first_k_dense": 3})
    with pytest.raises(ValueError, match="moe"):
        dense_config(moe={"n_routed_experts": 4})
    assert isinstance(moe_config().moe, MoEConfig)
    assert isinstance(dense_config(), ModelConfig)
