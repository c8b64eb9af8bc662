"""The cache's reference path: the core's quantizers in the cache layout, KIVI's window rule, bytes."""

import pytest
import torch

from fp8train.inference.kv_cache import StaticKVCache
from fp8train.inference.kv_modes import KVCacheMode, kv_quantization
from fp8train.inference.kv_reference import quantized_before
from fp8train.quant import E4M3, INT4, INT8, UINT4, Granularity, fake_quantize

B, H, D = 2, 3, 64


def _cache(mode, slots=80, **kw):
    return StaticKVCache(kv_quantization(mode, **kw), 2, B, H, slots, D)


def _core_fake(x, mode):
    """What the core says each token's key / value decodes to (x [B, H, T, D])."""
    rows = x.reshape(-1, D)
    fmt, grid, sym = {"fp8": (E4M3, Granularity.row(), True), "int8": (INT8, Granularity.row(), True),
                      "int4": (INT4, Granularity.tile(32), True)}[mode]
    return fake_quantize(rows, fmt, grid, symmetric=sym).reshape(x.shape)


@pytest.mark.parametrize("mode", ["fp8", "int8", "int4"])
def test_per_token_modes_decode_to_the_core_quantizer(mode):
    cache = _cache(mode)
    k, v = torch.randn(B, H, 20, D) * 3, torch.randn(B, H, 20, D)
    cache.write(1, k, v, 0)
    k1, v1 = torch.randn(B, H, 1, D), torch.randn(B, H, 1, D)
    cache.write(1, k1, v1, 20)
    k_read, v_read = cache.read(1, 21)
    torch.testing.assert_close(k_read, _core_fake(torch.cat([k, k1], 2), mode), rtol=0, atol=0)
    torch.testing.assert_close(v_read, _core_fake(torch.cat([v, v1], 2), mode), rtol=0, atol=0)


def test_kivi_keys_per_channel_values_per_token_and_the_bf16_window():
    group, residual = 16, 24
    cache = _cache("kivi", group=group, residual=residual)
    n = 70
    # bf16 values: KIVI quantizes the window's precision (bf16)
    k, v = torch.randn(B, H, n, D).bfloat16().float(), torch.randn(B, H, n, D).bfloat16().float()
    cache.write(0, k, v, 0)
    q = quantized_before(n, cache.quant)
    assert q == group * ((n - residual) // group) == 32
    k_read, v_read = cache.read(0, n)
    kg = k[:, :, :q].reshape(-1, group, D).transpose(1, 2).reshape(-1, group)  # [groups*D, G]: channel rows
    k_core = fake_quantize(kg, UINT4, Granularity.tile(group), symmetric=False)
    k_core = k_core.reshape(-1, D, group).transpose(1, 2).reshape(B, H, q, D)
    v_core = fake_quantize(v[:, :, :q].reshape(-1, D), UINT4, Granularity.tile(group), symmetric=False)
    torch.testing.assert_close(k_read[:, :, :q], k_core, rtol=0, atol=0)
    torch.testing.assert_close(v_read[:, :, :q], v_core.reshape(B, H, q, D), rtol=0, atol=0)
    torch.testing.assert_close(k_read[:, :, q:], k[:, :, q:].bfloat16().float(), rtol=0, atol=0)
    assert n - q >= residual


def test_kivi_step_by_step_equals_one_prefill():
    quant_kw = dict(group=16, residual=8)
    bulk, steps = _cache("kivi", **quant_kw), _cache("kivi", **quant_kw)
    k, v = torch.randn(B, H, 60, D), torch.randn(B, H, 60, D)
    bulk.write(0, k, v, 0)
    steps.write(0, k[:, :, :5], v[:, :, :5], 0)
    for t in range(5, 60):
        steps.write(0, k[:, :, t:t + 1], v[:, :, t:t + 1], torch.tensor(t))
    for a, b in zip(bulk.read(0, 60), steps.read(0, 60)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_int4_hadamard_stores_rotated_keys_and_reads_them_back():
    """Keys are the core's int4 g32 of R k (values plain int4); read() rotates them back."""
    from fp8train.quant.hadamard import hadamard_transform, inverse_hadamard_transform

    cache = _cache("int4_hadamard")
    k, v = torch.randn(B, H, 20, D) * 3, torch.randn(B, H, 20, D)
    k[..., 7] *= 30  # an outlier channel: what the rotation is for
    cache.write(0, k, v, 0)
    k_read, v_read = cache.read(0, 20)
    rotated = _core_fake(hadamard_transform(k, cache.key_signs), "int4")
    torch.testing.assert_close(k_read, inverse_hadamard_transform(rotated, cache.key_signs), rtol=0, atol=0)
    torch.testing.assert_close(v_read, _core_fake(v, "int4"), rtol=0, atol=0)
    plain = _cache("int4")
    plain.write(0, k, v, 0)
    assert (k_read - k).norm() < 0.5 * (plain.read(0, 20)[0] - k).norm()
    with pytest.raises(ValueError, match="power-of-2 head_dim, got 96"):
        StaticKVCache(kv_quantization("int4_hadamard"), 1, 1, 1, 8, 96)


def test_bytes_per_token_per_layer():
    expected = {"bf16": 512, "fp8": 264, "int8": 264, "int4": 2 * (64 + 4 * 4), "int4_hadamard": 2 * (64 + 4 * 4),
                "kivi": 2 * (64 + 5 * 4)}
    for mode, per_head in expected.items():
        assert kv_quantization(mode).bytes_per_token(128) == per_head
    cache = StaticKVCache(kv_quantization("int8"), 1, 1, 4, 64, 128)
    assert cache.bytes_per_token_per_layer() == 4 * 264
    assert cache.nbytes == 64 * 4 * 264  # codes + fp32 step, keys and values


def test_quantized_modes_are_close_to_the_values():
    k = torch.randn(1, 1, 64, D)
    errors = {}
    for mode in ("fp8", "int8", "int4", "kivi"):
        cache = StaticKVCache(kv_quantization(mode, residual=0) if mode == "kivi" else kv_quantization(mode),
                              1, 1, 1, 64, D)
        cache.write(0, k, k, 0)
        errors[mode] = ((cache.read(0, 64)[0] - k).norm() / k.norm()).item()
    assert errors["int8"] < 0.01 and errors["fp8"] < 0.05 and errors["int4"] < 0.15 and errors["kivi"] < 0.15


def test_bad_modes_and_shapes_are_refused():
    with pytest.raises(ValueError, match="kv_cache='int2'.*bf16"):
        kv_quantization("int2")
    with pytest.raises(ValueError, match="head_dim=48 is not a multiple of it"):
        StaticKVCache(kv_quantization("int4", group=32), 1, 1, 1, 8, 48)
    with pytest.raises(ValueError, match="residual"):
        kv_quantization("kivi", residual=-1)
    assert kv_quantization(KVCacheMode.KIVI).window == 128 + 32
