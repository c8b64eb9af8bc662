"""BPE tokenizer: trains on a small text, round-trips, and is rebuilt from a dataset."""

from __future__ import annotations

import pytest

from fp8train.data import BpeTokenizer, TokenFile, load_tokenizer, prepare_dataset

TEXT = ("The quick brown fox jumps over the lazy dog. " * 20
        + "def train(model, data):\n    return model(data)\n" * 20
        + "Ünïcödé, 日本語, emoji 🚀 and <|endoftext|> written out as plain text.\n")


def test_bpe_trains_and_round_trips():
    tokenizer = BpeTokenizer.train([TEXT], vocab_size=320)
    assert 257 < tokenizer.vocab_size <= 320
    ids = tokenizer.encode(TEXT)
    assert len(ids) < len(TEXT.encode("utf-8")) / 2  # merges actually compress
    assert tokenizer.eos_id not in ids  # the literal eos text is not the eos token
    assert tokenizer.decode(ids) == TEXT
    unseen = "zebra quartz ✓ ±∞"  # characters never seen in training still round-trip
    assert tokenizer.decode(tokenizer.encode(unseen)) == unseen


def test_bpe_vocab_too_small_is_rejected():
    with pytest.raises(ValueError, match="vocab_size 100"):
        BpeTokenizer.train([TEXT], vocab_size=100)


def test_bpe_dataset_saves_and_reloads_tokenizer(corpus_dir, tmp_path):
    dataset = prepare_dataset([corpus_dir], tmp_path / "bpe", tokenizer="bpe", vocab_size=400,
                              val_fraction=0.2, progress=False)
    train = TokenFile(dataset, "train", verify=True)
    assert train.meta["tokenizer"] == {"kind": "bpe", "file": "tokenizer.json"}
    tokenizer = load_tokenizer(train.meta, dataset)
    assert tokenizer.vocab_size == train.vocab_size and tokenizer.eos_id == train.eos_id
    first_doc = tokenizer.decode(train.read(0, train.num_tokens)).split("<|endoftext|>")[0]
    assert first_doc in {p.read_text(encoding="utf-8") for p in corpus_dir.rglob("*.py")}


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(ValueError, match="'sentencepiece'"):
        load_tokenizer({"tokenizer": {"kind": "sentencepiece"}}, tmp_path)
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer({"tokenizer": {"kind": "bpe", "file": "tokenizer.json"}}, tmp_path)
