"""The incremental decoder reproduces the model's own forward (prefill and step by step)."""

import pytest
import torch

from fp8train.inference.decoder import IncrementalDecoder
from fp8train.inference.generation import left_pad, make_cache
from fp8train.inference.kv_modes import kv_quantization
from fp8train.inference.protocol import decoder_parts
from tests.inference.helpers import random_ids, tiny_model, tiny_moe


def _decoder(model, batch, max_len, mode="bf16"):
    return IncrementalDecoder(model, make_cache(model, kv_quantization(mode), batch, max_len))


@pytest.mark.parametrize("make", [tiny_model, tiny_moe])
def test_prefill_then_steps_match_the_model_forward(make):
    model = make()
    ids = random_ids(2, 24)
    with torch.no_grad():
        full = model(ids)  # [B, T, V]
    dec = _decoder(model, 2, 24)
    start = torch.zeros(2, dtype=torch.long)
    prefill = dec.prefill(ids[:, :16], start)
    torch.testing.assert_close(prefill, full[:, :16], rtol=1e-5, atol=1e-5)
    for t in range(16, 24):
        logits = dec.step(ids[:, t], torch.tensor(t), start)
        # the bf16 cache rounds k and v (8 mantissa bits): a small, bounded difference
        torch.testing.assert_close(logits, full[:, t], rtol=0.02, atol=0.02)


def test_left_padded_batch_matches_each_prompt_alone():
    model = tiny_model()
    prompts = [random_ids(1, n, seed=n)[0].tolist() for n in (5, 11, 8)]
    ids, start = left_pad(prompts, "cpu")
    dec = _decoder(model, 3, ids.shape[1] + 4)
    batch_logits = dec.prefill(ids, start)[:, -1]
    next_tokens = batch_logits.argmax(-1)
    step_logits = dec.step(next_tokens, torch.tensor(ids.shape[1]), start)
    for row, prompt in enumerate(prompts):
        alone = _decoder(model, 1, len(prompt) + 4)
        zero = torch.zeros(1, dtype=torch.long)
        single = alone.prefill(torch.tensor([prompt]), zero)[:, -1]
        torch.testing.assert_close(batch_logits[row], single[0], rtol=1e-4, atol=1e-4)
        single_step = alone.step(next_tokens[row:row + 1], torch.tensor(len(prompt)), zero)
        torch.testing.assert_close(step_logits[row], single_step[0], rtol=1e-4, atol=1e-4)


def test_rope_matches_the_model_convention():
    from fp8train.inference.rope import rotate
    from fp8train.models.layers import apply_rotary

    model = tiny_model()
    parts = decoder_parts(model)
    x = torch.randn(2, 7, 4, parts.head_dim)
    positions = torch.arange(7)[None].expand(2, 7)
    torch.testing.assert_close(rotate(x, parts.cos, parts.sin, positions),
                               apply_rotary(x, parts.cos[:7], parts.sin[:7]), rtol=0, atol=0)


def test_protocol_names_the_missing_attribute():
    model = tiny_model()
    del model.layers[1].attn.q_proj
    with pytest.raises(ValueError, match=r"model.layers\[1\].attn has no attribute 'q_proj'"):
        decoder_parts(model)


def test_cache_longer_than_the_model_is_refused():
    model = tiny_model(max_seq_len=32)
    with pytest.raises(ValueError, match="exceeds the model's max_seq_len=32"):
        make_cache(model, kv_quantization("int8"), 1, 40)
