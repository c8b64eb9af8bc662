"""Named sizes, the config factory, and the closed-form parameter / FLOP counts."""

import pytest

from fp8train.models import (MODEL_SIZES, MoEConfig, build_model, count_parameters,
                             flops_per_token, model_config)
from tests.models.helpers import dense_config, moe_config

COUNT_CASES = {
    "dense_gqa": dense_config(),
    "dense_tied_mha": dense_config(tie_embeddings=True, n_kv_heads=4),
    "moe_shared": moe_config(),
    "moe_no_shared_all_moe": moe_config({"n_shared_experts": 0, "first_k_dense": 0}),
    "moe_all_dense": moe_config({"first_k_dense": 2}),
}


@pytest.mark.parametrize("case", sorted(COUNT_CASES))
def test_parameter_formula_matches_the_built_model(case):
    config = COUNT_CASES[case]
    model = build_model(config)
    unique_numel = sum(p.numel() for p in model.parameters())
    assert count_parameters(config) == unique_numel == model.num_parameters()
    without_embed = unique_numel - model.embed.weight.numel()
    assert count_parameters(config, exclude_embedding=True) == without_embed
    assert model.num_parameters(exclude_embedding=True) == without_embed


def test_active_parameters_count_only_top_k_experts():
    config = moe_config({"n_routed_experts": 8, "top_k": 2, "first_k_dense": 1})
    moe = config.moe
    inactive = (moe.n_routed_experts - moe.top_k) * 3 * config.d_model * moe.expert_ffn_hidden
    n_moe_layers = config.n_layers - moe.first_k_dense
    active = count_parameters(config, active_only=True)
    assert active == count_parameters(config) - n_moe_layers * inactive


def test_flops_per_token_dense_formula_and_linearity():
    config = dense_config()
    norms = (2 * config.n_layers + 1) * config.d_model
    matmul_params = count_parameters(config, exclude_embedding=True) - norms  # layers + lm_head
    attention = 12 * config.n_layers * config.d_model * 64
    assert flops_per_token(config, 64) == 6 * matmul_params + attention
    slope = flops_per_token(config, 128) - flops_per_token(config, 64)
    assert slope == 12 * config.n_layers * config.d_model * 64
    assert build_model(config).flops_per_token(64) == flops_per_token(config, 64) > 0


def test_flops_tied_head_still_counts_the_head_gemm():
    tied = flops_per_token(dense_config(tie_embeddings=True), 32)
    assert tied == flops_per_token(dense_config(), 32)


def test_moe_flops_use_active_experts_only():
    few_active = moe_config({"top_k": 1})
    more_active = moe_config({"top_k": 4})
    assert count_parameters(few_active) == count_parameters(more_active)
    assert 0 < flops_per_token(few_active, 32) < flops_per_token(more_active, 32)
    per_expert = 3 * few_active.d_model * few_active.moe.expert_ffn_hidden
    assert flops_per_token(more_active, 32) - flops_per_token(few_active, 32) == 6 * 3 * per_expert


@pytest.mark.parametrize("bad", [0, -5, 2.0, True])
def test_flops_rejects_bad_seq_len(bad):
    with pytest.raises(ValueError, match="seq_len"):
        flops_per_token(dense_config(), bad)


def test_unknown_size_lists_known_names():
    with pytest.raises(ValueError, match="known sizes.*tiny"):
        model_config("huge", vocab_size=100, max_seq_len=32)


def test_unknown_override_lists_allowed_fields():
    with pytest.raises(ValueError, match="n_layer.*allowed"):
        model_config("tiny", vocab_size=100, max_seq_len=32, n_layer=3)
    with pytest.raises(ValueError, match="topk.*allowed"):
        model_config("moe_tiny", vocab_size=100, max_seq_len=32, moe={"topk": 1})
    with pytest.raises(ValueError, match="build_model needs a ModelConfig"):
        build_model({"d_model": 64})


def test_overrides_and_moe_merge():
    config = model_config("moe_tiny", vocab_size=100, max_seq_len=32, n_layers=3,
                          moe={"top_k": 1})
    assert config.n_layers == 3 and config.moe.top_k == 1
    assert config.moe.n_routed_experts == MODEL_SIZES["moe_tiny"]["moe"]["n_routed_experts"]
    assert model_config("moe_tiny", 100, 32, moe=None).moe is None
    explicit = MoEConfig(n_routed_experts=4, n_shared_experts=0, top_k=1, expert_ffn_hidden=16)
    assert model_config("tiny", 100, 32, moe=explicit).moe == explicit
    assert "moe" not in MODEL_SIZES["tiny"]  # the table itself is not mutated


@pytest.mark.parametrize("name, low, high", [
    ("125m", 110e6, 140e6), ("350m", 330e6, 400e6), ("1b", 0.9e9, 1.1e9), ("moe_1b", 0.9e9, 1.1e9),
    ("moe_2b", 1.5e9, 2.1e9), ("moe_2b_wide", 1.5e9, 2.1e9),
])
def test_named_sizes_have_their_advertised_size(name, low, high):
    config = model_config(name, vocab_size=32000, max_seq_len=2048)
    assert low < count_parameters(config) < high


@pytest.mark.parametrize("name", sorted(MODEL_SIZES))
def test_named_sizes_have_gemm_dims_multiple_of_128(name):
    config = model_config(name, vocab_size=32000, max_seq_len=2048)
    dims = [config.d_model, config.ffn_hidden, config.n_heads * config.head_dim,
            config.n_kv_heads * config.head_dim]
    if config.moe is not None:
        dims.append(config.moe.expert_ffn_hidden)
    assert all(dim % 128 == 0 for dim in dims), dims


@pytest.mark.parametrize("name", sorted(MODEL_SIZES))
def test_every_named_size_resolves(name):
    config = model_config(name, vocab_size=512, max_seq_len=128)
    assert config.vocab_size == 512 and config.max_seq_len == 128
    assert ("moe" in name) == (config.moe is not None)
