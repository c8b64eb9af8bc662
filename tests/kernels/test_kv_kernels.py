"""KV-cache kernels vs the reference cache: codes bit for bit, attention to FP32 tolerance.

Tiny shapes; on a CPU the kernels run in Triton's interpreter (tests/kernels/conftest.py)."""

import pytest
import torch

from fp8train.inference.kv_cache import StaticKVCache, kernels_usable
from fp8train.inference.kv_modes import kv_quantization
from fp8train.inference.rope import rotate

B, H, D = 2, 2, 32
MODES = {"bf16": {}, "fp8": {}, "int8": {}, "int4": dict(group=16), "int4_hadamard": dict(group=16),
         "kivi": dict(group=8, residual=12), "int4_centered": dict(group=16)}  # int4_centered: sink 1
CASES = [(mode, {}) for mode in MODES] + [("int8", dict(sink=3)), ("int4_centered", dict(sink=20))]


def _pair(mode, device, heads=H, slots=48, **override):
    quant = kv_quantization(mode, **{**MODES[mode], **override})
    return [StaticKVCache(quant, 1, B, heads, slots, D, device=device, use_kernels=use) for use in (False, True)]


def _assert_same_storage(ref, ker):
    for name, a in ref.storage.items():
        b = ker.storage[name]
        if a.dtype == torch.float8_e4m3fn:
            a, b = a.view(torch.uint8), b.view(torch.uint8)
        assert torch.equal(a.cpu(), b.cpu()), f"{name} differs in {(a.cpu() != b.cpu()).sum()} places"


@pytest.mark.parametrize("mode, override", CASES, ids=[m + "".join(f"-{k}{v}" for k, v in o.items()) for m, o in CASES])
def test_write_codes_and_attention_match_the_reference(mode, override, device):
    """Prefill, then decode writes; a sink of 20 outlives the 17-token prompt of the padded row."""
    ref, ker = _pair(mode, device, **override)
    g = torch.Generator().manual_seed(0)
    k, v = (torch.randn(B, H, 17, D, generator=g) * 2).to(device), torch.randn(B, H, 17, D, generator=g).to(device)
    start = torch.tensor([0, 7], device=device)  # row 1 is left-padded by 7 slots
    for cache in (ref, ker):
        cache.write(0, k, v, 0, start)
    for t in range(17, 22):  # decode writes (KIVI, G = 8, R = 12: the first group leaves the window at t = 19)
        kn, vn = torch.randn(B, H, 1, D, generator=g).to(device), torch.randn(B, H, 1, D, generator=g).to(device)
        for cache in (ref, ker):
            cache.write(0, kn, vn, torch.tensor(t, device=device), start)
    _assert_same_storage(ref, ker)
    q = torch.randn(B, 2 * H, D, generator=g).to(device)  # GQA: two query heads per KV head
    expected = ref.attend(0, q, 21, start)
    for splits, block in ((1, 16), (4, 16)):  # KIVI: two key groups of 8 per 16-slot tile
        got = ker.attend(0, q, torch.tensor(21, device=device), start, splits=splits, block_n=block)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("group, residual, block", [(4, 0, 32), (16, 3, 16), (32, 5, 16)])
def test_kivi_attention_at_other_group_sizes(group, residual, block, device):
    """Tiles of several key groups (G < BLOCK_N) and groups of several tiles (G > BLOCK_N)."""
    ref, ker = _pair("kivi", device, slots=64, group=group, residual=residual)
    g = torch.Generator().manual_seed(3)
    k, v = (torch.randn(B, H, 40, D, generator=g) * 2).to(device), torch.randn(B, H, 40, D, generator=g).to(device)
    for cache in (ref, ker):
        cache.write(0, k, v, 0)
    for t in range(40, 43):
        kn, vn = torch.randn(B, H, 1, D, generator=g).to(device), torch.randn(B, H, 1, D, generator=g).to(device)
        for cache in (ref, ker):
            cache.write(0, kn, vn, torch.tensor(t, device=device))
    _assert_same_storage(ref, ker)
    q = torch.randn(B, 2 * H, D, generator=g).to(device)
    start = torch.tensor([0, 5], device=device)
    expected = ref.attend(0, q, 42, start)
    for splits in (1, 2):
        got = ker.attend(0, q, torch.tensor(42, device=device), start, splits=splits, block_n=block)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_sizes_the_kernels_cannot_take_are_refused_with_the_reason(device):
    with pytest.raises(ValueError, match="block_n=8"):
        _pair("kivi", device)[1].attend(0, torch.zeros(B, 2 * H, D, device=device), torch.tensor(3, device=device),
                                        torch.zeros(B, dtype=torch.long, device=device), block_n=8)
    with pytest.raises(ValueError, match="head_dim=48 is not a power of 2"):
        StaticKVCache(kv_quantization("int8"), 1, B, H, 16, 48, device=device, use_kernels=True)
    with pytest.raises(ValueError, match="head_dim=16 < 32"):
        StaticKVCache(kv_quantization("int4", group=8), 1, B, H, 16, 16, device=device, use_kernels=True)
    ok, reason = kernels_usable(torch.device(device), kv_quantization("kivi", group=6), 48, forced=True)
    assert not ok and "head_dim=48 is not a power of 2" in reason  # by default the reference serves it


@pytest.mark.parametrize("mode", ["int8", "int4_hadamard", "kivi", "int4_centered"])
def test_rope_fused_write_matches_rotate_then_write(mode, device):
    """Decode writes from slot 0 on (int4_centered: the first write, at slot 0, sets mu)."""
    ref, ker = _pair(mode, device, **(dict(residual=4) if mode == "kivi" else {}))
    g = torch.Generator().manual_seed(1)
    cos = torch.randn(64, D // 2, generator=g).to(device)
    sin = torch.randn(64, D // 2, generator=g).to(device)
    start = torch.tensor([0, 3], device=device)
    for t in range(0, 14):  # KIVI (G = 8, R = 4) flushes its first group at t = 11
        q = torch.randn(B, 2 * H, D, generator=g).to(device)
        kn, vn = torch.randn(B, H, D, generator=g).to(device), torch.randn(B, H, D, generator=g).to(device)
        slot = torch.tensor(t, device=device)
        q_ref = ref.write_rotary(0, q, kn, vn, slot, cos, sin, start)
        q_ker = ker.write_rotary(0, q, kn, vn, slot, cos, sin, start)
        torch.testing.assert_close(q_ker, q_ref, rtol=1e-6, atol=1e-6)
    if device == "cpu":  # the interpreter rounds exactly like torch
        _assert_same_storage(ref, ker)
    else:  # a GPU may fuse RoPE's multiply-adds: an ulp apart, a code may flip at a rounding tie
        k_ref, _ = ref.read(0, 14)
        k_ker, _ = ker.read(0, 14)
        assert (k_ker - k_ref).abs().mean() < 0.02


def test_rotate_is_the_reference_of_the_fused_rope():
    x = torch.randn(1, 1, 1, D)
    cos, sin = torch.ones(4, D // 2), torch.zeros(4, D // 2)
    assert torch.equal(rotate(x, cos, sin, torch.tensor([[3]])), x)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_bf16_queries_take_the_bf16_tensor_core_path(mode, device):
    ref, ker = _pair(mode, device)
    g = torch.Generator().manual_seed(2)
    k, v = torch.randn(B, H, 30, D, generator=g).to(device), torch.randn(B, H, 30, D, generator=g).to(device)
    for cache in (ref, ker):
        cache.write(0, k, v, 0)
    q = torch.randn(B, 2 * H, D, generator=g).to(device).bfloat16()
    start = torch.tensor([0, 4], device=device)
    expected = ref.attend(0, q.float(), 29, start)
    got = ker.attend(0, q, torch.tensor(29, device=device), start, splits=2, block_n=16)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected, rtol=0.03, atol=0.03)


def test_decoder_on_the_centered_cache_kernels_matches_the_reference(device):
    """A left-padded batch decoded through int4_centered on the kernels (mu from the prefill, the
    sink, RoPE fused into the write) gives the reference path's logits."""
    from fp8train.inference.decoder import IncrementalDecoder
    from fp8train.inference.generation import left_pad, make_cache
    from tests.inference.helpers import random_ids, tiny_model

    model = tiny_model(d_model=128, n_heads=4, n_kv_heads=2).to(device)  # head_dim 32
    quant = kv_quantization("int4_centered", group=16)
    ids, start = left_pad([random_ids(1, n, seed=n)[0].tolist() for n in (5, 9)], device)
    logits = []
    for use in (False, True):
        dec = IncrementalDecoder(model, make_cache(model, quant, 2, ids.shape[1] + 3, use_kernels=use))
        tokens = dec.prefill(ids, start)[:, -1].argmax(-1)
        steps = [dec.step(tokens, torch.tensor(ids.shape[1] + i, device=device), start) for i in range(3)]
        logits.append(torch.stack(steps))
        assert dec.cache.use_kernels == use
    torch.testing.assert_close(logits[1], logits[0], rtol=2e-3, atol=2e-3)
