"""unigram_entropy against distributions whose entropy is known in closed form."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fp8train.data import TokenFile, unigram_entropy
from fp8train.data.stats import token_counts
from fp8train.data.token_file import TokenWriter, write_meta


def _token_file(directory, tokens, vocab_size) -> TokenFile:
    directory.mkdir(parents=True, exist_ok=True)
    writer = TokenWriter(directory, "train", "uint16")
    writer.append(np.asarray(tokens))
    write_meta(directory, {"format": "fp8train-tokens", "version": 1, "dtype": "uint16",
                           "vocab_size": vocab_size, "eos_id": 0, "source": "test",
                           "tokenizer": {"kind": "byte", "file": None},
                           "splits": {"train": writer.commit()}})
    return TokenFile(directory, "train")


def test_dyadic_distribution_is_1_75_bits(tmp_path):
    rng = np.random.default_rng(0)
    tokens = rng.permutation(np.repeat([0, 1, 2, 3], [400, 200, 100, 100]))
    token_file = _token_file(tmp_path, tokens, vocab_size=257)
    assert token_counts(token_file)[:5].tolist() == [400, 200, 100, 100, 0]
    assert unigram_entropy(token_file) == pytest.approx(1.75 * math.log(2), rel=1e-12)


def test_uniform_over_vocab_is_log_vocab_and_constant_is_zero(tmp_path):
    uniform = _token_file(tmp_path / "u", np.tile(np.arange(257), 3), vocab_size=257)
    assert unigram_entropy(uniform) == pytest.approx(math.log(257), rel=1e-12)
    constant = _token_file(tmp_path / "c", np.full(50, 7), vocab_size=257)
    assert unigram_entropy(constant) == 0.0


def test_empty_split_is_an_error(tmp_path):
    empty = _token_file(tmp_path, np.zeros(0, dtype=np.int64), vocab_size=257)
    with pytest.raises(ValueError, match="empty"):
        unigram_entropy(empty)
