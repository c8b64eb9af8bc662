"""BF16 sink tokens (`KVQuantization.sink`): the first tokens of every row stay exact beside their codes.

Exact where it is exact: a sink slot reads back the BF16 rounding of what was written (int4:
bit for bit; int4_centered: the centered key's BF16 plus mu), every other slot reads back exactly
what a cache without a sink reads, and left padding moves the sink with the row's first token."""

import pytest
import torch

from fp8train.inference import kv_reference as ref
from fp8train.inference.kv_cache import StaticKVCache
from fp8train.inference.kv_modes import kv_quantization
from fp8train.quant.hadamard import hadamard_transform, inverse_hadamard_transform

B, H, D, SLOTS = 2, 3, 64, 24


def _kv(tokens, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, H, tokens, D, generator=g) * 3, torch.randn(B, H, tokens, D, generator=g)


def _filled(quant, start, prefill=8, decode=4):
    """A cache of `quant` after a prefill of `prefill` slots and `decode` one-token writes."""
    cache = StaticKVCache(quant, 1, B, H, SLOTS, D)
    k, v = _kv(prefill + decode)
    cache.write(0, k[:, :, :prefill], v[:, :, :prefill], 0, start)
    for t in range(prefill, prefill + decode):
        cache.write(0, k[:, :, t:t + 1], v[:, :, t:t + 1], t, start)
    return cache, k, v


@pytest.mark.parametrize("sink", [1, 3])
def test_sink_slots_read_back_bf16_and_the_rest_as_without_a_sink(sink):
    start = torch.tensor([0, 2])  # row 1 left-padded by two slots
    with_sink, k, v = _filled(kv_quantization("int4", sink=sink), start)
    without, _, _ = _filled(kv_quantization("int4"), start)
    k_read, v_read = with_sink.read(0, 12)
    k_plain, v_plain = without.read(0, 12)
    for row in range(B):
        sink_slots = set(range(int(start[row]), int(start[row]) + sink))
        for slot in range(12):
            if slot in sink_slots:
                assert torch.equal(k_read[row, :, slot], k[row, :, slot].bfloat16().float())
                assert torch.equal(v_read[row, :, slot], v[row, :, slot].bfloat16().float())
            else:
                assert torch.equal(k_read[row, :, slot], k_plain[row, :, slot])
                assert torch.equal(v_read[row, :, slot], v_plain[row, :, slot])


def test_a_sink_longer_than_the_prompt_fills_from_decode_writes():
    start = torch.zeros(B, dtype=torch.long)
    cache, k, v = _filled(kv_quantization("int4", sink=6), start, prefill=2, decode=6)
    k_read, _ = cache.read(0, 8)
    assert torch.equal(k_read[:, :, :6], k[:, :, :6].bfloat16().float())
    assert not torch.equal(k_read[:, :, 6:8], k[:, :, 6:8].bfloat16().float())  # quantized


def test_centered_sink_keeps_the_stored_key_and_attention_reads_it():
    quant = kv_quantization("int4_centered")
    assert quant.sink == 1  # the mode's default
    start = torch.tensor([1, 0])
    cache, k, v = _filled(quant, start)
    mu, signs = cache.key_mean[0], cache.key_signs
    k_read, v_read = cache.read(0, 12)
    for row in range(B):  # the sink holds the key as the codes see it: centered, then rotated
        s = int(start[row])
        stored = hadamard_transform(k[row, :, s].float() - mu[row], signs).bfloat16().float()
        assert torch.equal(k_read[row, :, s], inverse_hadamard_transform(stored, signs) + mu[row])
    q = torch.randn(B, 2 * H, D)
    torch.testing.assert_close(cache.attend(0, q, 11, start), ref.attention(q, k_read, v_read, start),
                               rtol=1e-5, atol=1e-5)


def test_sink_bytes_and_bad_settings():
    assert kv_quantization("int4_centered").per_sequence_bytes(64) == 4 * 64 + 1 * 2 * 64 * 2
    assert kv_quantization("int8", sink=4).per_sequence_bytes(128) == 4 * 2 * 128 * 2
    assert kv_quantization("int4_centered", sink=0).sink == 0
    cache = StaticKVCache(kv_quantization("int4", sink=2), 3, B, H, SLOTS, D)
    plain = StaticKVCache(kv_quantization("int4"), 3, B, H, SLOTS, D)
    assert cache.nbytes - plain.nbytes == 2 * 3 * B * H * 2 * D * 2  # k and v, BF16, per layer/row/head
    with pytest.raises(ValueError, match="per-token quantized modes"):
        kv_quantization("kivi", sink=1)
    with pytest.raises(ValueError, match="per-token quantized modes"):
        kv_quantization("bf16", sink=1)
    with pytest.raises(ValueError, match="int >= 0"):
        kv_quantization("int4", sink=-1)
