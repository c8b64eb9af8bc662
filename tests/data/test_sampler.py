"""TrainBatches / ValBatches: windows, determinism, rank/micro-step invariance, resume."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from fp8train.data import TokenFile, TrainBatches, ValBatches
from fp8train.data.token_file import TokenWriter, write_meta


@pytest.fixture
def counting_file(tmp_path):
    """Token i has id i, so a window is identified by its first input id."""
    num_tokens = 1001
    writer = TokenWriter(tmp_path, "train", "uint32")
    writer.append(np.arange(num_tokens))
    split = writer.commit()
    write_meta(tmp_path, {"format": "fp8train-tokens", "version": 1, "dtype": "uint32",
                          "vocab_size": 70_000, "eos_id": 0, "source": "counting",
                          "tokenizer": {"kind": "bpe", "file": "tokenizer.json"},
                          "splits": {"train": split, "val": split}})
    return TokenFile(tmp_path, "train")


def _window_starts(step, micro_steps, world_size, **kwargs):
    """Window start offsets of one optimizer step, gathered over all ranks and micro-steps."""
    starts = []
    for rank in range(world_size):
        loader = TrainBatches(rank=rank, world_size=world_size, **kwargs)
        for micro_step in range(micro_steps):
            input_ids, _ = loader.get(step, micro_step)
            starts.extend(input_ids[:, 0].tolist())
    return starts


def test_windows_are_shifted_pairs_and_one_epoch_covers_each_once(counting_file):
    loader = TrainBatches(counting_file, seq_len=10, micro_batch_size=4, seed=3)
    assert loader.num_windows == 100
    input_ids, labels = loader.get(0, 0)
    assert input_ids.dtype == labels.dtype == torch.int64 and input_ids.shape == (4, 10)
    assert torch.equal(labels, input_ids + 1)  # counting tokens: the label is the next id
    epoch = loader.window_starts(np.arange(100))
    assert sorted(epoch.tolist()) == list(range(0, 1000, 10))
    assert epoch.tolist() != list(range(0, 1000, 10))  # shuffled
    next_epoch = loader.window_starts(np.arange(100, 200))
    assert sorted(next_epoch.tolist()) == sorted(epoch.tolist())
    assert next_epoch.tolist() != epoch.tolist()  # a fresh permutation per epoch


def test_same_seed_same_batches_other_seed_other_batches(counting_file):
    first = TrainBatches(counting_file, 10, 4, grad_accum_steps=2, seed=7)
    second = TrainBatches(counting_file, 10, 4, grad_accum_steps=2, seed=7)
    other = TrainBatches(counting_file, 10, 4, grad_accum_steps=2, seed=8)
    for _ in range(30):
        batch, same, different = next(first), next(second), next(other)
        assert torch.equal(batch[0], same[0]) and torch.equal(batch[1], same[1])
    assert not torch.equal(batch[0], different[0])


@pytest.mark.parametrize("layout", [(3, 2, 4), (3, 4, 2), (12, 1, 2), (6, 2, 2), (1, 24, 1)])
def test_step_samples_do_not_depend_on_rank_and_micro_step_split(counting_file, layout):
    micro_batch_size, micro_steps, world_size = layout
    for step in (0, 1, 5, 9):  # 24 samples per step, 100 windows: step 4 crosses an epoch
        reference = _window_starts(step, 24, 1, token_file=counting_file, seq_len=10,
                                   micro_batch_size=1, grad_accum_steps=24, seed=11)
        split = _window_starts(step, micro_steps, world_size, token_file=counting_file,
                               seq_len=10, micro_batch_size=micro_batch_size,
                               grad_accum_steps=micro_steps, seed=11)
        assert Counter(split) == Counter(reference) and len(split) == 24


def test_ranks_of_one_step_never_share_a_sample(counting_file):
    starts = _window_starts(0, 2, 4, token_file=counting_file, seq_len=10,
                            micro_batch_size=3, grad_accum_steps=2, seed=0)
    assert len(set(starts)) == len(starts) == 24


def test_resume_from_state_dict_reproduces_next_batches(counting_file):
    original = TrainBatches(counting_file, 10, 3, grad_accum_steps=4, seed=5)
    for _ in range(7):
        next(original)
    state = original.state_dict()
    assert (state["step"], state["micro_step"]) == (1, 3)
    resumed = TrainBatches(counting_file, 10, 3, grad_accum_steps=4, seed=5)
    resumed.load_state_dict(dict(state))
    for _ in range(50):
        expected, actual = next(original), next(resumed)
        assert torch.equal(expected[0], actual[0]) and torch.equal(expected[1], actual[1])


def test_resume_with_new_layout_at_step_boundary(counting_file):
    one_rank = TrainBatches(counting_file, 10, 2, grad_accum_steps=4, seed=5)
    for _ in range(8):
        next(one_rank)
    state = one_rank.state_dict()  # step 2, micro_step 0
    gathered = []
    for rank in range(2):
        loader = TrainBatches(counting_file, 10, 2, grad_accum_steps=2, rank=rank, world_size=2,
                              seed=5)
        loader.load_state_dict(state)
        gathered += [next(loader)[0][:, 0].tolist() for _ in range(2)]
    expected = [next(one_rank)[0][:, 0].tolist() for _ in range(4)]
    assert Counter(sum(gathered, [])) == Counter(sum(expected, []))


@pytest.mark.parametrize("field, kwargs", [
    ("seed", dict(seed=6)), ("seq_len", dict(seq_len=20)),
    ("global_batch_size", dict(grad_accum_steps=2)),
])
def test_resume_refuses_a_different_stream(counting_file, field, kwargs):
    saved = TrainBatches(counting_file, 10, 3, grad_accum_steps=4, seed=5).state_dict()
    arguments = dict(seq_len=10, micro_batch_size=3, grad_accum_steps=4, seed=5) | kwargs
    with pytest.raises(ValueError, match=field):
        TrainBatches(counting_file, **arguments).load_state_dict(saved)


def test_resume_mid_step_refuses_a_different_layout(counting_file):
    loader = TrainBatches(counting_file, 10, 2, grad_accum_steps=4, seed=5)
    next(loader)
    other_layout = TrainBatches(counting_file, 10, 4, grad_accum_steps=2, seed=5)
    with pytest.raises(ValueError, match="micro_batch_size"):
        other_layout.load_state_dict(loader.state_dict())


def test_argument_errors(counting_file):
    with pytest.raises(ValueError, match="rank"):
        TrainBatches(counting_file, 10, 2, rank=2, world_size=2)
    with pytest.raises(ValueError, match="seq_len"):
        TrainBatches(counting_file, 0, 2)
    with pytest.raises(ValueError, match="too few"):
        TrainBatches(counting_file, 1001, 2)
    with pytest.raises(ValueError, match="micro_step"):
        TrainBatches(counting_file, 10, 2, grad_accum_steps=2).get(0, 2)


def test_val_batches_are_sequential_sharded_and_restartable(counting_file):
    loaders = [ValBatches(counting_file, 10, 3, rank=r, world_size=2) for r in range(2)]
    assert len(loaders[0]) == len(loaders[1]) == 100 // 6
    per_rank = [[batch[0][:, 0].tolist() for batch in loader] for loader in loaders]
    interleaved = [start for pair in zip(*per_rank) for batch in pair for start in batch]
    assert interleaved == list(range(0, 960, 10))  # in order, no gaps, no overlap
    input_ids, labels = next(iter(loaders[1]))
    assert torch.equal(labels, input_ids + 1) and input_ids[0, 0] == 30
    assert [b[0].tolist() for b in loaders[0]] == [b[0].tolist() for b in loaders[0]]
    assert len(ValBatches(counting_file, 10, 3, max_batches=4)) == 4
    with pytest.raises(ValueError, match="val-fraction"):
        ValBatches(counting_file, 100, 8, world_size=2)
