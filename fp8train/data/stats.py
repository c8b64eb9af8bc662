"""Corpus statistics used as sanity baselines for training curves.

The unigram entropy H = -sum_v p(v) ln p(v), with p(v) the frequency of token v in the split,
is the cross-entropy loss (nats per token) of the best model that ignores context. A language
model whose loss is not clearly below it has learned nothing beyond token frequencies; a fresh
model starts near ln(vocab_size), which is above it.
"""

from __future__ import annotations

import numpy as np

from fp8train.data.token_file import TokenFile

_CHUNK_TOKENS = 1 << 24  # count in chunks so a large split is never loaded whole


def token_counts(token_file: TokenFile) -> np.ndarray:
    """How often each id 0..vocab_size-1 occurs in the split (int64, length vocab_size)."""
    counts = np.zeros(token_file.vocab_size, dtype=np.int64)
    for start in range(0, token_file.num_tokens, _CHUNK_TOKENS):
        chunk = np.asarray(token_file.tokens[start:start + _CHUNK_TOKENS])
        chunk_counts = np.bincount(chunk, minlength=token_file.vocab_size)
        if chunk_counts.size > token_file.vocab_size:
            raise ValueError(f"{token_file.path} holds token id {chunk_counts.size - 1} >= "
                             f"vocab_size {token_file.vocab_size}; the file is corrupt")
        counts += chunk_counts
    return counts


def unigram_entropy(token_file: TokenFile) -> float:
    """Entropy of the split's token frequencies, in nats per token."""
    counts = token_counts(token_file)
    total = counts.sum()
    if total == 0:
        raise ValueError(f"{token_file.path} is empty; the unigram entropy is undefined")
    probabilities = counts[counts > 0] / total
    return float(-(probabilities * np.log(probabilities)).sum())
