"""int4_centered: keys minus the prompt's mean key, Hadamard-rotated, uint4 asymmetric g32 per token.

What is exact is tested exactly: the softmax identity (float64), the integer codes against the core's
quantizer, the mean of a left-padded row against the row alone. What is not (dequantized keys) is
tested against the quantization step the cache itself stored."""

import math

import pytest
import torch

from fp8train.inference import kv_reference as ref
from fp8train.inference.kv_cache import StaticKVCache
from fp8train.inference.kv_modes import KVCacheMode, kv_quantization
from fp8train.quant.granularity import GranularityKind
from fp8train.quant.hadamard import hadamard_transform
from fp8train.quant.packing import pack_4bit
from fp8train.quant.spec import QuantSpec

B, H, D = 2, 3, 64
UINT4_G32 = QuantSpec("uint4", GranularityKind.TILE, 32, symmetric=False)


def _cache(batch=B, slots=40, **kw):
    return StaticKVCache(kv_quantization("int4_centered"), 2, batch, H, slots, D, **kw)


def _keys(batch, tokens, seed=0):
    """Keys like a real model's: a large per-channel offset (what centering removes) plus noise."""
    g = torch.Generator().manual_seed(seed)
    offset = torch.randn(1, H, 1, D, generator=g) * 4
    offset[..., 5] *= 10  # an outlier channel
    return offset + torch.randn(batch, H, tokens, D, generator=g)


def _attention64(q, k, v):
    scores = torch.einsum("bhd,bhnd->bhn", q, k) / math.sqrt(q.shape[-1])
    return torch.einsum("bhn,bhnd->bhd", scores.softmax(-1), v)


def test_centering_leaves_attention_unchanged_exactly():
    """softmax(q . (k - mu)) == softmax(q . k): q . mu is one constant per query."""
    q = torch.randn(B, H, D, dtype=torch.float64)
    k, v = _keys(B, 30).double(), torch.randn(B, H, 30, D, dtype=torch.float64)
    mu = k.mean(dim=2, keepdim=True)
    torch.testing.assert_close(_attention64(q, k - mu, v), _attention64(q, k, v), rtol=0, atol=1e-6)


def test_attend_reads_centered_keys_and_equals_attention_over_read():
    cache = _cache()
    k, v = _keys(B, 20), torch.randn(B, H, 20, D)
    start = torch.zeros(B, dtype=torch.long)
    cache.write(0, k, v, 0, start)
    q = torch.randn(B, 2 * H, D)  # GQA: two query heads per KV head
    k_read, v_read = cache.read(0, 20)
    out = cache.attend(0, q, 19, start)
    torch.testing.assert_close(out, ref.attention(q, k_read, v_read, start), rtol=1e-5, atol=1e-5)


def test_codes_are_the_core_quantizer_of_rotated_centered_keys():
    """Prefill sets mu; a later decode write reuses it. Codes, steps and zeros bit for bit."""
    cache = _cache()
    k, v = _keys(B, 21), torch.randn(B, H, 21, D)
    cache.write(1, k[:, :, :20], v[:, :, :20], 0, torch.zeros(B, dtype=torch.long))
    mu = cache.key_mean[1]
    torch.testing.assert_close(mu, k[:, :, :20].mean(dim=2), rtol=0, atol=1e-5)
    cache.write(1, k[:, :, 20:], v[:, :, 20:], torch.tensor(20), torch.zeros(B, dtype=torch.long))
    assert torch.equal(cache.key_mean[1], mu)  # decode writes do not move mu
    layer = cache.layer(1)
    rotated = hadamard_transform(k - mu[:, :, None], cache.key_signs)
    expected = UINT4_G32.quantize(rotated.reshape(-1, D))
    assert torch.equal(layer.k_codes[:, :, :21].reshape(-1, D // 2), pack_4bit(expected.data))
    assert torch.equal(layer.k_scale[:, :, :21].reshape(-1, 2), expected.scale_inv.reshape(-1, 2))
    assert torch.equal(layer.k_zero[:, :, :21].reshape(-1, 2), expected.zero_point.reshape(-1, 2))
    values = UINT4_G32.quantize(v.reshape(-1, D))
    assert torch.equal(layer.v_codes[:, :, :21].reshape(-1, D // 2), pack_4bit(values.data))


def test_read_returns_the_keys_within_the_stored_step():
    """|read - k| per token <= the rounding error the stored steps allow (R is orthogonal: the L2
    error of R (k - mu) is the error of k), and far below int4_hadamard's on offset keys."""
    cache = _cache()
    k, v = _keys(B, 24), torch.randn(B, H, 24, D)
    cache.write(0, k, v, 0)
    k_read = cache.read(0, 24)[0]
    steps = cache.layer(0).k_scale[:, :, :24]  # [B, H, T, D / 32]
    bound = (steps / 2).pow(2).sum(-1).mul(32).sqrt()  # every channel off by <= step / 2
    assert ((k_read - k).norm(dim=-1) <= bound * (1 + 1e-5) + 1e-6).all()
    rotated_only = StaticKVCache(kv_quantization("int4_hadamard"), 2, B, H, 40, D)
    rotated_only.write(0, k, v, 0)
    assert (k_read - k).norm() < 0.5 * (rotated_only.read(0, 24)[0] - k).norm()


def test_left_padded_row_gets_the_same_mean_and_codes_as_the_row_alone():
    k_alone, v_alone = _keys(1, 9, seed=1), torch.randn(1, H, 9, D)
    pad = 4
    k_pad = torch.cat([torch.randn(1, H, pad, D) * 50, k_alone], dim=2)  # garbage in the padded slots
    k_batch = torch.cat([k_pad, _keys(1, 13, seed=2)], dim=0)  # row 1 unpadded
    v_batch = torch.cat([torch.cat([torch.zeros(1, H, pad, D), v_alone], 2), torch.randn(1, H, 13, D)])
    batch, alone = _cache(), _cache(batch=1)
    batch.write(0, k_batch, v_batch, 0, torch.tensor([pad, 0]))
    alone.write(0, k_alone, v_alone, 0, torch.zeros(1, dtype=torch.long))
    assert torch.equal(batch.key_mean[0, 0], alone.key_mean[0, 0])
    for name in ("k_codes", "k_scale", "k_zero"):
        assert torch.equal(getattr(batch.layer(0), name)[0, :, pad:13], getattr(alone.layer(0), name)[0, :, :9])
    assert not batch.layer(0).k_codes[0, :, :pad].any()  # padded slots store zeros, like every mode
    # the same holds for the next decode token, written at slot 13 (batch) and 9 (alone)
    k_next = torch.randn(1, H, 1, D)
    batch.write(0, torch.cat([k_next, k_next]), torch.zeros(2, H, 1, D), 13, torch.tensor([pad, 0]))
    alone.write(0, k_next, torch.zeros(1, H, 1, D), 9, torch.zeros(1, dtype=torch.long))
    assert torch.equal(batch.layer(0).k_codes[0, :, 13], alone.layer(0).k_codes[0, :, 9])


def test_one_token_prefill_is_its_own_mean_and_reads_back_exactly():
    cache = _cache()
    k, v = _keys(B, 1), torch.randn(B, H, 1, D)
    cache.write(0, k, v, 0)
    assert torch.equal(cache.key_mean[0], k[:, :, 0])
    assert not cache.layer(0).k_codes[:, :, 0].any()
    torch.testing.assert_close(cache.read(0, 1)[0], k, rtol=0, atol=0)


def test_bytes_count_zero_points_and_the_mean_key():
    quant = kv_quantization(KVCacheMode.INT4_CENTERED)
    # keys and values: 64 bytes of codes + 4 groups x (fp32 step + uint8 zero) at head_dim 128
    assert quant.bytes_per_token(128) == 2 * (64 + 4 * 5) == kv_quantization("kivi").bytes_per_token(128)
    # once per sequence and KV head: mu (128 fp32) and the sink token's key and value (2 x 128 bf16)
    assert quant.per_sequence_bytes(128) == 512 + 512
    assert quant.bytes_per_token(128, context=512) == 168 + 2
    assert kv_quantization("int4").bytes_per_token(128, context=512) == 160
    cache = _cache(slots=32)
    per_layer = 32 * H * (2 * (32 + 2 * 5)) + H * 4 * D + H * 2 * D * 2
    assert cache.nbytes == 2 * B * per_layer
    assert cache.bytes_per_token_per_layer() == H * (84 + 8 * D / 32)


def test_bad_sizes_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="power-of-2 head_dim, got 96; choose kv_cache=int4 or kivi"):
        StaticKVCache(kv_quantization("int4_centered"), 1, 1, 1, 8, 96)
    with pytest.raises(ValueError, match="head_dim=16 is not a multiple of it"):
        StaticKVCache(kv_quantization("int4_centered", group=32), 1, 1, 1, 8, 16)
    assert _cache().backend[0] == "reference"  # CPU tensors (the kernels: tests/kernels/test_kv_kernels.py)


def test_decoder_left_padded_batch_matches_each_prompt_alone():
    """The decoder hands `start` to the prefill write: padding never enters a row's mean key."""
    from fp8train.inference.decoder import IncrementalDecoder
    from fp8train.inference.generation import left_pad, make_cache
    from tests.inference.helpers import random_ids, tiny_model

    model = tiny_model(d_model=128, n_heads=2, n_kv_heads=1)  # head_dim 64
    quant = kv_quantization("int4_centered")
    prompts = [random_ids(1, n, seed=n)[0].tolist() for n in (5, 11)]
    ids, start = left_pad(prompts, "cpu")
    dec = IncrementalDecoder(model, make_cache(model, quant, 2, ids.shape[1] + 2))
    next_tokens = dec.prefill(ids, start)[:, -1].argmax(-1)
    step_logits = dec.step(next_tokens, torch.tensor(ids.shape[1]), start)
    for row, prompt in enumerate(prompts):
        alone = IncrementalDecoder(model, make_cache(model, quant, 1, len(prompt) + 2))
        zero = torch.zeros(1, dtype=torch.long)
        alone.prefill(torch.tensor([prompt]), zero)
        torch.testing.assert_close(dec.cache.key_mean[:, row], alone.cache.key_mean[:, 0], rtol=1e-5, atol=1e-5)
        single = alone.step(next_tokens[row:row + 1], torch.tensor(len(prompt)), zero)
        torch.testing.assert_close(step_logits[row], single[0], rtol=1e-3, atol=1e-3)
