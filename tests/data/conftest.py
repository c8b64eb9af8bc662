"""Shared fixtures: a tiny multi-document text corpus and its prepared byte dataset."""

from __future__ import annotations

import pytest

from fp8train.data import prepare_dataset


def write_corpus(root, num_docs: int = 12) -> None:
    (root / "sub").mkdir(parents=True)
    for index in range(num_docs):
        folder = root / "sub" if index % 3 == 0 else root
        lines = [f"def function_{index}_{line}(x):\n    return x * {line} + {index}  # naïve €\n"
                 for line in range(20 + 7 * index)]
        (folder / f"doc_{index:02d}.py").write_text("".join(lines), encoding="utf-8")
    (root / "ignored.bin").write_bytes(b"\x00\xff" * 100)  # not matched by the default glob


@pytest.fixture
def corpus_dir(tmp_path):
    root = tmp_path / "corpus"
    write_corpus(root)
    return root


@pytest.fixture
def byte_dataset(corpus_dir, tmp_path):
    return prepare_dataset([corpus_dir], tmp_path / "dataset", val_fraction=0.2, progress=False)
