"""generate(): greedy equals argmax of the model's forward, batches equal single prompts, sampling is seeded."""

import pytest
import torch

from fp8train.inference.generation import generate
from fp8train.inference.sampling import SamplingConfig, filter_logits, sample
from tests.inference.helpers import random_ids, tiny_model


def _greedy_by_forward(model, prompt, n):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def test_greedy_generation_matches_the_full_forward():
    model = tiny_model()
    prompt = random_ids(1, 9)[0].tolist()
    result = generate(model, [prompt], max_new_tokens=12, kv_cache="bf16")
    assert result.tokens[0] == _greedy_by_forward(model, prompt, 12)


def test_batch_of_prompts_equals_each_alone_and_eos_stops_a_row():
    model = tiny_model()
    prompts = [random_ids(1, n, seed=n)[0].tolist() for n in (3, 10, 6)]
    alone = [generate(model, [p], max_new_tokens=8, kv_cache="int8").tokens[0] for p in prompts]
    batch = generate(model, prompts, max_new_tokens=8, kv_cache="int8").tokens
    assert batch == alone
    eos = alone[1][2]  # row 1 stops at its third token (or earlier if eos came before)
    stopped = generate(model, prompts, max_new_tokens=8, kv_cache="int8", eos_id=eos).tokens
    assert stopped[1] == alone[1][:alone[1].index(eos) + 1]


def test_streaming_callback_sees_every_step():
    model = tiny_model()
    seen = []
    result = generate(model, [[1, 2, 3]], max_new_tokens=5, on_step=lambda step, toks: seen.append((step, toks)))
    assert [s for s, _ in seen] == [1, 2, 3, 4, 5]
    assert [t[0] for _, t in seen] == result.tokens[0]


def test_sampling_is_seeded_and_differs_from_greedy():
    model = tiny_model()
    config = SamplingConfig(temperature=1.5, top_k=20, top_p=0.95, seed=7)
    a = generate(model, [[5, 6]], max_new_tokens=16, sampling=config).tokens
    b = generate(model, [[5, 6]], max_new_tokens=16, sampling=config).tokens
    greedy = generate(model, [[5, 6]], max_new_tokens=16).tokens
    assert a == b and a != greedy


def test_top_k_and_top_p_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, 2, 1.0)).tolist() == [[False, False, True, True]]
    # top_p = 0.7: 0.5 alone is below, 0.5 + 0.3 reaches it -> keep two
    assert torch.isinf(filter_logits(logits, 0, 0.7)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, 0, 0.4)).tolist() == [[False, True, True, True]]
    draws = sample(logits.repeat(2000, 1), SamplingConfig(temperature=1.0, top_k=2, seed=0),
                   torch.Generator().manual_seed(0))
    assert set(draws.tolist()) == {0, 1}
    assert abs((draws == 0).float().mean().item() - 0.5 / 0.8) < 0.04


@pytest.mark.parametrize("bad", [dict(temperature=-1.0), dict(top_k=-2), dict(top_p=0.0), dict(top_p=1.5)])
def test_bad_sampling_settings_are_refused(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        SamplingConfig(**bad)


def test_bad_generation_inputs_are_refused():
    model = tiny_model()
    with pytest.raises(ValueError, match="kv_cache='int3'"):
        generate(model, [[1]], max_new_tokens=2, kv_cache="int3")
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[]], max_new_tokens=2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, [[1]], max_new_tokens=0)


def test_kv_quality_rows_and_the_forward_reference():
    from fp8train.inference.quality import format_table, kv_cache_quality

    model = tiny_model()
    tokens = random_ids(1, 200, seed=3)[0]
    rows = kv_cache_quality(model, tokens, ["bf16", "int8", "fp8"], window=48, prefill=8, n_windows=3)
    assert [r.mode for r in rows] == ["bf16", "int8", "fp8", "(forward)"]
    assert all(r.tokens == 3 * 40 for r in rows)
    assert abs(rows[0].nll - rows[-1].nll) < 0.02 * rows[-1].nll  # the bf16 cache ~ the forward
    assert rows[1].bytes_per_token_per_layer < rows[0].bytes_per_token_per_layer
    assert "| int8 |" in format_table(rows)
