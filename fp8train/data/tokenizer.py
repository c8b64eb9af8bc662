"""Tokenizers: text <-> token ids, with one small interface for both kinds.

* `ByteTokenizer`: id = the UTF-8 byte (0..255), plus one end-of-document id 256, so
  vocab_size = 257. Needs no training and no file, never fails on any text, and gives the
  honest "bits per byte" baseline; sequences are ~3-4x longer than with BPE.
* `BpeTokenizer`: byte-level BPE trained with the HuggingFace `tokenizers` library. Byte-level
  means the base alphabet is the 256 bytes (each mapped to a printable stand-in character), so
  any text encodes without an unknown token and decodes back exactly; merges learned on the
  corpus then shorten sequences. Saved as tokenizer.json in the dataset directory.

Both expose `encode(str) -> list[int]`, `decode(list[int]) -> str`, `vocab_size`, `eos_id`.
`encode` never emits `eos_id`; the prepare step inserts it between documents.
`load_tokenizer(meta, directory)` rebuilds the tokenizer a dataset's meta.json describes.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

EOS_TOKEN = "<|endoftext|>"
TOKENIZER_FILENAME = "tokenizer.json"
MIN_BPE_VOCAB_SIZE = 257  # the 256 byte symbols + the eos token


class ByteTokenizer:
    kind = "byte"
    vocab_size = 257
    eos_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_array(self, text: str) -> np.ndarray:
        """Fast path for prepare: the bytes viewed as uint8, no Python list."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)

    def decode(self, token_ids: Iterable[int]) -> str:
        """Invalid UTF-8 (a window cut mid-character) decodes to U+FFFD; eos to EOS_TOKEN."""
        pieces, current = [], bytearray()
        for token_id in token_ids:
            token_id = int(token_id)
            if token_id == self.eos_id:
                pieces.append(current.decode("utf-8", errors="replace") + EOS_TOKEN)
                current = bytearray()
            elif 0 <= token_id < 256:
                current.append(token_id)
            else:
                raise ValueError(f"token id {token_id} is outside the byte tokenizer's "
                                 f"vocabulary 0..{self.vocab_size - 1}")
        return "".join(pieces) + current.decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=257, eos_id=256)"


class BpeTokenizer:
    """Wraps a HuggingFace `tokenizers.Tokenizer` built by `train` or loaded from a file."""

    kind = "bpe"

    def __init__(self, hf_tokenizer):
        eos_id = hf_tokenizer.token_to_id(EOS_TOKEN)
        if eos_id is None:
            raise ValueError(f"the BPE tokenizer has no {EOS_TOKEN!r} token; "
                             f"train it with fp8train.data.prepare --tokenizer bpe")
        # Text that happens to contain "<|endoftext|>" must not turn into the eos id
        # (the switch exists in tokenizers >= 0.15; older versions keep matching it).
        if hasattr(hf_tokenizer, "encode_special_tokens"):
            hf_tokenizer.encode_special_tokens = True
        self._hf = hf_tokenizer
        self.eos_id = int(eos_id)
        self.vocab_size = int(hf_tokenizer.get_vocab_size(with_added_tokens=True))

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, num_texts: int | None = None):
        if vocab_size < MIN_BPE_VOCAB_SIZE:
            raise ValueError(f"BPE vocab_size {vocab_size} is too small: byte-level BPE needs "
                             f"at least {MIN_BPE_VOCAB_SIZE} (256 bytes + eos); "
                             f"use e.g. --vocab-size 4096")
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        hf_tokenizer = Tokenizer(models.BPE())
        hf_tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf_tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=[EOS_TOKEN], show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        hf_tokenizer.train_from_iterator(texts, trainer=trainer, length=num_texts)
        return cls(hf_tokenizer)

    @classmethod
    def from_file(cls, path: str | os.PathLike):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file {path} not found; prepare the dataset "
                                    f"again with `python -m fp8train.data.prepare "
                                    f"--tokenizer bpe ...`")
        from tokenizers import Tokenizer
        try:
            hf_tokenizer = Tokenizer.from_file(str(path))
        except Exception as error:  # the library raises a bare Exception on bad JSON
            raise ValueError(f"{path} is not a valid tokenizer file ({error})") from error
        return cls(hf_tokenizer)

    def save(self, path: str | os.PathLike) -> None:
        path = Path(path)
        tmp_path = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        self._hf.save(str(tmp_path))
        os.replace(tmp_path, path)

    def encode(self, text: str) -> list[int]:
        return self._hf.encode(text, add_special_tokens=False).ids

    def encode_array(self, text: str) -> np.ndarray:
        return np.asarray(self.encode(text), dtype=np.int64)

    def decode(self, token_ids: Iterable[int]) -> str:
        ids = [int(token_id) for token_id in token_ids]
        bad = [token_id for token_id in ids if not 0 <= token_id < self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the BPE vocabulary "
                             f"0..{self.vocab_size - 1}")
        return self._hf.decode(ids, skip_special_tokens=False)

    def __repr__(self) -> str:
        return f"BpeTokenizer(vocab_size={self.vocab_size}, eos_id={self.eos_id})"


def load_tokenizer(meta: dict, directory: str | os.PathLike):
    """The tokenizer described by a dataset's meta.json (`meta`) living in `directory`."""
    spec = meta.get("tokenizer") or {}
    kind = spec.get("kind")
    if kind == "byte":
        tokenizer = ByteTokenizer()
    elif kind == "bpe":
        tokenizer = BpeTokenizer.from_file(Path(directory) / (spec.get("file") or TOKENIZER_FILENAME))
    else:
        raise ValueError(f"unknown tokenizer kind {kind!r} in {Path(directory) / 'meta.json'}; "
                         f"allowed: 'byte', 'bpe'")
    if "vocab_size" in meta and tokenizer.vocab_size != meta["vocab_size"]:
        raise ValueError(f"tokenizer in {directory} has vocab_size {tokenizer.vocab_size} but "
                         f"meta.json says {meta['vocab_size']}; prepare the dataset again")
    return tokenizer
