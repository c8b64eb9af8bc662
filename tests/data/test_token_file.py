"""TokenFile: round trip from prepare, and clear errors for every kind of damage."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from fp8train.data import ByteTokenizer, TokenFile
from fp8train.data.token_file import TokenWriter, write_meta


def _documents(token_file: TokenFile) -> list[str]:
    text = token_file.tokenizer().decode(token_file.read(0, token_file.num_tokens))
    pieces = text.split("<|endoftext|>")
    assert pieces[-1] == ""  # every document, including the last, ends with eos
    return pieces[:-1]


def test_round_trip_recovers_every_document_once(corpus_dir, byte_dataset):
    train, val = TokenFile(byte_dataset, "train", verify=True), TokenFile(byte_dataset, "val")
    expected = sorted(p.read_text(encoding="utf-8") for p in corpus_dir.rglob("*.py"))
    assert sorted(_documents(train) + _documents(val)) == expected
    assert train.vocab_size == 257 and train.eos_id == 256 and train.dtype == np.uint16
    assert val.num_tokens > 0 and train.num_tokens > 3 * val.num_tokens
    assert isinstance(train.tokens, np.memmap) and not train.tokens.flags.writeable


def test_uint32_dtype_round_trip(tmp_path):
    writer = TokenWriter(tmp_path, "train", "uint32")
    writer.append(np.array([0, 70_000, 123_456]))
    splits = {"train": writer.commit()}
    write_meta(tmp_path, {"format": "fp8train-tokens", "version": 1, "dtype": "uint32",
                          "vocab_size": 200_000, "eos_id": 0, "splits": splits, "source": "t",
                          "tokenizer": {"kind": "bpe", "file": "tokenizer.json"}})
    token_file = TokenFile(tmp_path, "train", verify=True)
    assert token_file.read(0, 3).tolist() == [0, 70_000, 123_456]


def test_missing_dir_names_path_and_fix(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing)) + ".*fp8train.data.prepare"):
        TokenFile(missing)


def test_missing_meta_names_path(byte_dataset):
    (byte_dataset / "meta.json").unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(str(byte_dataset / "meta.json"))):
        TokenFile(byte_dataset)


def test_missing_bin_names_path(byte_dataset):
    (byte_dataset / "val.bin").unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(str(byte_dataset / "val.bin"))):
        TokenFile(byte_dataset, "val")


def test_truncated_bin_is_reported_as_corrupt(byte_dataset):
    path = byte_dataset / "train.bin"
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(ValueError, match=f"{re.escape(str(path))}.*corrupt or truncated"):
        TokenFile(byte_dataset, "train")


def _edit_meta(dataset, **changes) -> None:
    meta = json.loads((dataset / "meta.json").read_text())
    meta.update(changes)
    (dataset / "meta.json").write_text(json.dumps(meta))


def test_bad_dtype_names_meta_and_value(byte_dataset):
    _edit_meta(byte_dataset, dtype="float16")
    with pytest.raises(ValueError, match="meta.json.*'float16'"):
        TokenFile(byte_dataset)


def test_wrong_format_and_bad_json(byte_dataset):
    _edit_meta(byte_dataset, format="something-else")
    with pytest.raises(ValueError, match="meta.json.*something-else"):
        TokenFile(byte_dataset)
    (byte_dataset / "meta.json").write_text("{not json")
    with pytest.raises(ValueError, match="meta.json.*not valid JSON"):
        TokenFile(byte_dataset)


def test_unknown_split_lists_available(byte_dataset):
    with pytest.raises(ValueError, match="'test'.*train.*val"):
        TokenFile(byte_dataset, "test")


def test_verify_detects_changed_bytes(byte_dataset):
    path = byte_dataset / "train.bin"
    data = bytearray(path.read_bytes())
    data[10] ^= 1  # same size, so only the checksum can notice
    path.write_bytes(bytes(data))
    TokenFile(byte_dataset, "train")  # cheap checks pass
    with pytest.raises(ValueError, match=f"{re.escape(str(path))}.*sha256"):
        TokenFile(byte_dataset, "train", verify=True)


def test_token_id_above_vocab_is_rejected(byte_dataset):
    path = byte_dataset / "train.bin"
    data = np.fromfile(path, dtype="<u2")
    data[len(data) // 2] = 300  # byte vocab is 257
    data.tofile(path)
    with pytest.raises(ValueError, match=f"{re.escape(str(path))}.*300 >= vocab_size 257"):
        TokenFile(byte_dataset, "train")


def test_byte_tokenizer_is_the_utf8_bytes():
    tokenizer = ByteTokenizer()
    text = "héllo, wörld ✓ 🚀\n\ttabs"
    ids = tokenizer.encode(text)
    assert ids == list(text.encode("utf-8")) and max(ids) < 256
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode(ids + [256] + ids[:5]) == text + "<|endoftext|>" + "héll"
    with pytest.raises(ValueError, match="257"):
        tokenizer.decode([257])
