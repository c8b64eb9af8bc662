"""Token files: one flat array of token ids per split, memory-mapped for reading.

A dataset directory holds one raw binary file per split plus one JSON description:

    <dir>/train.bin     little-endian uint16 ids (uint32 when vocab_size > 65536)
    <dir>/val.bin
    <dir>/meta.json     {"format": "fp8train-tokens", "version": 1, "dtype": "uint16",
                         "vocab_size": 257, "eos_id": 256,
                         "tokenizer": {"kind": "byte", "file": null},
                         "splits": {"train": {"num_tokens": N, "sha256": "..."}, ...},
                         "source": "where the text came from"}

Documents are concatenated with `eos_id` between them, so a split is just a long token stream
and any window of it is a training sample. The .bin files carry no header: the bytes are the
array, which is what makes `numpy.memmap` reading free (the OS pages in only what a batch
touches, and every rank of a node shares the same page cache).

Writers (`TokenWriter`, `write_meta`) write to a temporary name and `os.replace` into place,
and meta.json is written last: a directory whose meta.json exists is complete.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

FORMAT_NAME = "fp8train-tokens"
FORMAT_VERSION = 1
META_FILENAME = "meta.json"
DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
PREPARE_HINT = "create it with `python -m fp8train.data.prepare --input PATH --output DIR`"
_SAMPLE_BLOCK = 4096  # tokens per block in the out-of-vocabulary spot check
_SAMPLE_BLOCKS = 64


def dtype_name_for_vocab(vocab_size: int) -> str:
    """uint16 holds ids 0..65535, so it covers every vocabulary up to 65536 entries."""
    return "uint16" if vocab_size <= 2**16 else "uint32"


def split_path(directory: str | os.PathLike, split: str) -> Path:
    return Path(directory) / f"{split}.bin"


def file_sha256(path: str | os.PathLike, chunk_bytes: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def _atomic_write_text(path: Path, text: str) -> None:
    tmp_path = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp_path, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp_path, path)


def write_meta(directory: str | os.PathLike, meta: dict) -> Path:
    """Atomically write meta.json; call it after every .bin file is in place."""
    path = Path(directory) / META_FILENAME
    _atomic_write_text(path, json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return path


class TokenWriter:
    """Streams token ids into `<dir>/<split>.bin` through a temporary file.

    `append` may be called many times; `commit` renames the finished file into place and
    returns its (num_tokens, sha256) for meta.json; `abort` deletes the temporary file.
    """

    def __init__(self, directory: str | os.PathLike, split: str, dtype_name: str):
        self.final_path = split_path(directory, split)
        self.tmp_path = self.final_path.with_name(f".{self.final_path.name}.tmp-{os.getpid()}")
        self.dtype = DTYPES[dtype_name]
        self.num_tokens = 0
        self._digest = hashlib.sha256()
        self._handle = open(self.tmp_path, "wb")

    def append(self, token_ids) -> None:
        array = np.asarray(token_ids)
        if array.size and (array.min() < 0 or array.max() > np.iinfo(self.dtype).max):
            raise ValueError(f"token ids out of range for {self.dtype.name}: "
                             f"min {array.min()}, max {array.max()}")
        data = array.astype(self.dtype, copy=False).tobytes()
        self._handle.write(data)
        self._digest.update(data)
        self.num_tokens += array.size

    def commit(self) -> dict:
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._handle.close()
        os.replace(self.tmp_path, self.final_path)
        return {"num_tokens": self.num_tokens, "sha256": self._digest.hexdigest()}

    def abort(self) -> None:
        self._handle.close()
        self.tmp_path.unlink(missing_ok=True)


def read_meta(directory: str | os.PathLike) -> dict:
    """Load and validate meta.json; errors name the file and say what is wrong."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"dataset directory {directory} does not exist; {PREPARE_HINT}")
    meta_path = directory / META_FILENAME
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path} not found: {directory} is not a prepared "
                                f"dataset (or its prepare did not finish); {PREPARE_HINT}")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{meta_path} is not valid JSON ({error}); it is corrupt: "
                         f"delete the directory and prepare it again") from error
    _validate_meta(meta, meta_path)
    return meta


def _validate_meta(meta, meta_path: Path) -> None:
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ValueError(f"{meta_path}: format is {found!r}, expected {FORMAT_NAME!r}; "
                         f"this is not an fp8train token dataset")
    if meta.get("version") != FORMAT_VERSION:
        raise ValueError(f"{meta_path}: version {meta.get('version')!r} is not supported "
                         f"(this fp8train reads version {FORMAT_VERSION}); prepare it again")
    if meta.get("dtype") not in DTYPES:
        raise ValueError(f"{meta_path}: unknown dtype {meta.get('dtype')!r}; "
                         f"allowed: {sorted(DTYPES)}")
    for key in ("vocab_size", "eos_id"):
        if not isinstance(meta.get(key), int) or meta[key] < 0:
            raise ValueError(f"{meta_path}: {key} must be a non-negative integer, "
                             f"got {meta.get(key)!r}")
    if np.iinfo(DTYPES[meta["dtype"]]).max + 1 < meta["vocab_size"]:
        raise ValueError(f"{meta_path}: dtype {meta['dtype']} cannot hold vocab_size "
                         f"{meta['vocab_size']}")
    if meta["eos_id"] >= meta["vocab_size"]:
        raise ValueError(f"{meta_path}: eos_id {meta['eos_id']} is not below vocab_size "
                         f"{meta['vocab_size']}")
    if not isinstance(meta.get("splits"), dict):
        raise ValueError(f"{meta_path}: 'splits' must be an object of split name -> "
                         f"{{num_tokens, sha256}}, got {meta.get('splits')!r}")


class TokenFile:
    """Read-only, memory-mapped view of one split of a prepared dataset.

    `tokens` is a numpy.memmap of `num_tokens` ids; `read(start, length)` copies a window out
    as int64. Opening checks the size of the .bin against meta.json and spot-checks that ids
    are below vocab_size; `verify=True` also recomputes the sha256 (reads the whole file).
    """

    def __init__(self, directory: str | os.PathLike, split: str = "train", verify: bool = False):
        self.directory = Path(directory)
        self.split = split
        self.meta = read_meta(self.directory)
        self.meta_path = self.directory / META_FILENAME
        if split not in self.meta["splits"]:
            raise ValueError(f"{self.meta_path} has no split {split!r}; available splits: "
                             f"{sorted(self.meta['splits'])}")
        split_meta = self.meta["splits"][split]
        self.num_tokens = int(split_meta.get("num_tokens", -1))
        self.sha256 = str(split_meta.get("sha256", ""))
        self.dtype = DTYPES[self.meta["dtype"]]
        self.vocab_size = int(self.meta["vocab_size"])
        self.eos_id = int(self.meta["eos_id"])
        self.path = split_path(self.directory, split)
        self._check_size()
        if verify:
            self.verify_sha256()
        self.tokens = self._map()
        self._check_ids_in_vocab()

    def _check_size(self) -> None:
        if self.num_tokens < 0:
            raise ValueError(f"{self.meta_path}: split {self.split!r} has no valid num_tokens")
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path} not found although {self.meta_path} lists "
                                    f"split {self.split!r}; {PREPARE_HINT}")
        expected = self.num_tokens * self.dtype.itemsize
        actual = self.path.stat().st_size
        if actual != expected:
            raise ValueError(f"{self.path} is corrupt or truncated: {actual} bytes, expected "
                             f"{expected} ({self.num_tokens} tokens x {self.dtype.itemsize} bytes "
                             f"per {self.meta['dtype']}); prepare the dataset again")

    def verify_sha256(self) -> None:
        actual = file_sha256(self.path)
        if actual != self.sha256:
            raise ValueError(f"{self.path} is corrupt: sha256 {actual} does not match "
                             f"{self.sha256} recorded in {self.meta_path}; prepare it again")

    def _map(self) -> np.ndarray:
        if self.num_tokens == 0:  # numpy cannot map an empty file
            return np.zeros(0, dtype=self.dtype)
        return np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.num_tokens,))

    def _check_ids_in_vocab(self) -> None:
        """Checks the head, the tail and evenly spaced blocks: a cheap guard, not a proof."""
        span = _SAMPLE_BLOCK * _SAMPLE_BLOCKS
        if self.num_tokens <= span:
            sample = self.tokens[:]
        else:
            starts = np.linspace(0, self.num_tokens - _SAMPLE_BLOCK, _SAMPLE_BLOCKS).astype(np.int64)
            sample = np.concatenate([self.tokens[s:s + _SAMPLE_BLOCK] for s in starts])
        if sample.size and int(sample.max()) >= self.vocab_size:
            raise ValueError(f"{self.path} holds token id {int(sample.max())} >= vocab_size "
                             f"{self.vocab_size} from {self.meta_path}; the file is corrupt or "
                             f"belongs to another tokenizer; prepare it again")

    def __len__(self) -> int:
        return self.num_tokens

    def read(self, start: int, length: int) -> np.ndarray:
        """Copy tokens[start:start+length] out of the map as int64."""
        if start < 0 or length < 0 or start + length > self.num_tokens:
            raise IndexError(f"window [{start}, {start + length}) is outside {self.path} "
                             f"({self.num_tokens} tokens)")
        return np.asarray(self.tokens[start:start + length], dtype=np.int64)

    def tokenizer(self):
        from fp8train.data.tokenizer import load_tokenizer
        return load_tokenizer(self.meta, self.directory)

    def __repr__(self) -> str:
        return (f"TokenFile({str(self.directory)!r}, split={self.split!r}, "
                f"num_tokens={self.num_tokens}, vocab_size={self.vocab_size})")
