"""Build a token dataset from text files: `prepare_dataset` (the CLI lives in prepare.py).

Steps, each deterministic so the same inputs always give byte-identical .bin files:
1. Collect documents: every explicitly named file, and every file under a named folder whose
   name matches the glob patterns, walked recursively in sorted order (hidden entries and
   __pycache__ skipped). One file = one document. `max_bytes` caps the total; the last file
   is cut to fit.
2. Split by document: a fixed-seed permutation of the documents is walked, moving documents
   to val until val holds `val_fraction` of the bytes (train always keeps one). A single
   document is cut at a line boundary instead, so a one-file corpus still gets a val split.
3. Tokenize (byte, or byte-level BPE trained on the train documents), append eos after each
   document, and stream ids into <split>.bin through temporary files.
4. Rename the .bin files into place, then write meta.json last.
"""

from __future__ import annotations

import codecs
import fnmatch
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from fp8train.data.token_file import (FORMAT_NAME, FORMAT_VERSION, META_FILENAME, TokenWriter,
                                      dtype_name_for_vocab, read_meta, write_meta)
from fp8train.data.tokenizer import (MIN_BPE_VOCAB_SIZE, TOKENIZER_FILENAME, BpeTokenizer,
                                     ByteTokenizer)

DEFAULT_GLOB = "*.py,*.txt,*.md,*.rst"
SPLIT_SEED = 1234  # fixed: the split is part of the dataset, not of a training run
SKIPPED_DIR_NAMES = {"__pycache__"}


@dataclass(frozen=True)
class Document:
    path: Path
    num_bytes: int  # how much of the file to read (max_bytes may cut the last file)
    start_byte: int = 0  # nonzero only for the val half of a single cut document


def _walk_folder(folder: Path, patterns: list[str], exclude: Path | None) -> list[Path]:
    found = []
    for root, dir_names, file_names in os.walk(folder):
        root_path = Path(root)
        dir_names[:] = sorted(name for name in dir_names if not name.startswith(".")
                              and name not in SKIPPED_DIR_NAMES
                              and (exclude is None or (root_path / name).resolve() != exclude))
        for name in sorted(file_names):
            if not name.startswith(".") and any(fnmatch.fnmatch(name, p) for p in patterns):
                found.append(root_path / name)
    return found


def collect_files(inputs, glob: str = DEFAULT_GLOB, exclude: str | os.PathLike | None = None
                  ) -> list[Path]:
    """Files named in `inputs` plus glob-matching files under named folders, in sorted order."""
    patterns = [p.strip() for p in glob.split(",") if p.strip()]
    exclude_path = Path(exclude).resolve() if exclude is not None else None
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files.extend(_walk_folder(path, patterns, exclude_path))
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"input {path} does not exist; pass existing text files or "
                                    f"folders to --input")
    if not files:
        raise ValueError(f"no input files found in {[str(i) for i in inputs]} matching glob "
                         f"{glob!r}; pass other folders or widen --glob")
    return files


def plan_documents(files: list[Path], max_bytes: int | None) -> list[Document]:
    if max_bytes is not None and max_bytes <= 0:
        raise ValueError(f"max_bytes must be positive or None, got {max_bytes}")
    documents, total = [], 0
    for path in files:
        size = path.stat().st_size
        if max_bytes is not None:
            size = min(size, max_bytes - total)
        if size > 0:
            documents.append(Document(path, size))
            total += size
        if max_bytes is not None and total >= max_bytes:
            break
    if not documents:
        raise ValueError(f"all {len(files)} input files are empty; nothing to prepare")
    return documents


def read_document(document: Document) -> str:
    with open(document.path, "rb") as handle:
        handle.seek(document.start_byte)
        data = handle.read(document.num_bytes)
    # final=False leaves out a multi-byte character that a max_bytes cut split in two;
    # genuinely invalid bytes elsewhere still become U+FFFD.
    return codecs.getincrementaldecoder("utf-8")(errors="replace").decode(data, final=False)


def _cut_single_document(document: Document, val_fraction: float) -> list[Document]:
    """Cut one document after the last newline before (1 - val_fraction) of its bytes."""
    with open(document.path, "rb") as handle:
        data = handle.read(document.num_bytes)
    target = int(len(data) * (1.0 - val_fraction))
    cut = data.rfind(b"\n", 0, target) + 1 or target  # no newline before target: cut at target
    if not 0 < cut < len(data):
        return [document]
    return [Document(document.path, cut), Document(document.path, len(data) - cut, cut)]


def split_documents(documents: list[Document], val_fraction: float
                    ) -> tuple[list[Document], list[Document]]:
    """(train, val), each in corpus order; val gets about val_fraction of the bytes."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if val_fraction == 0.0:
        return documents, []
    if len(documents) == 1:
        documents = _cut_single_document(documents[0], val_fraction)
        return documents[:1], documents[1:]
    target = val_fraction * sum(d.num_bytes for d in documents)
    order = np.random.Generator(np.random.PCG64(SPLIT_SEED)).permutation(len(documents))
    val_indices, val_bytes = set(), 0
    for index in order[:-1]:  # the last one in the order always stays in train
        if val_bytes >= target:
            break
        val_indices.add(int(index))
        val_bytes += documents[index].num_bytes
    train = [d for i, d in enumerate(documents) if i not in val_indices]
    val = [d for i, d in enumerate(documents) if i in val_indices]
    return train, val


def describe_source(inputs, glob: str, tokenizer: str, vocab_size: int, val_fraction: float,
                    max_bytes: int | None) -> str:
    paths = ", ".join(str(Path(i).resolve()) for i in inputs)
    if tokenizer == "byte":
        vocab_size = ByteTokenizer.vocab_size  # the requested size does not apply
    return (f"files [{paths}] glob={glob!r} tokenizer={tokenizer} vocab_size={vocab_size} "
            f"val_fraction={val_fraction} max_bytes={max_bytes}")


def _check_output_dir(output_dir: Path, source: str, overwrite: bool) -> None:
    """Refuse to clobber a different dataset (or any other non-empty folder)."""
    if not output_dir.exists():
        return
    if not output_dir.is_dir():
        raise ValueError(f"output {output_dir} exists and is not a folder; choose another "
                         f"--output")
    if overwrite or not any(output_dir.iterdir()):
        return
    if not (output_dir / META_FILENAME).is_file():
        raise ValueError(f"output folder {output_dir} is not empty and holds no fp8train "
                         f"dataset; choose an empty --output or pass --overwrite")
    try:
        existing_source = read_meta(output_dir).get("source")
    except ValueError:
        existing_source = None
    if existing_source != source:
        raise ValueError(f"output folder {output_dir} already holds a different dataset "
                         f"(source: {existing_source!r}); choose another --output or pass "
                         f"--overwrite to replace it")


def _check_tokenizer_options(kind: str, vocab_size: int) -> None:
    if kind not in ("byte", "bpe"):
        raise ValueError(f"unknown tokenizer {kind!r}; allowed: 'byte', 'bpe'")
    if kind == "bpe" and not MIN_BPE_VOCAB_SIZE <= vocab_size <= 2**32:
        raise ValueError(f"BPE vocab_size {vocab_size} is out of range; it must be at least "
                         f"{MIN_BPE_VOCAB_SIZE} (256 bytes + eos), e.g. --vocab-size 4096")


def _build_tokenizer(kind: str, vocab_size: int, train_documents: list[Document]):
    if kind == "byte":
        return ByteTokenizer()
    texts = (read_document(document) for document in train_documents)
    return BpeTokenizer.train(texts, vocab_size, num_texts=len(train_documents))


def _write_split(output_dir: Path, split: str, documents: list[Document], tokenizer,
                 dtype_name: str, progress_bar) -> dict:
    writer = TokenWriter(output_dir, split, dtype_name)
    eos = np.array([tokenizer.eos_id], dtype=np.int64)
    try:
        for document in documents:
            writer.append(tokenizer.encode_array(read_document(document)))
            writer.append(eos)
            progress_bar.update(document.num_bytes)
    except BaseException:
        writer.abort()
        raise
    return writer.commit()


def prepare_dataset(inputs, output_dir: str | os.PathLike, tokenizer: str = "byte",
                    vocab_size: int = 4096, val_fraction: float = 0.05,
                    max_bytes: int | None = None, *, glob: str = DEFAULT_GLOB,
                    overwrite: bool = False, source: str | None = None,
                    progress: bool = True) -> Path:
    """Tokenize text files/folders into `output_dir` (train.bin, val.bin, meta.json).

    `vocab_size` applies to BPE only (the byte tokenizer always has 257). `source` overrides
    the recorded description of the inputs; preparing into a folder that holds a dataset with
    another source raises ValueError unless `overwrite`. Returns the dataset folder.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    _check_tokenizer_options(tokenizer, vocab_size)
    output_dir = Path(output_dir)
    source = source or describe_source(inputs, glob, tokenizer, vocab_size, val_fraction,
                                       max_bytes)
    documents = plan_documents(collect_files(inputs, glob, exclude=output_dir), max_bytes)
    _check_output_dir(output_dir, source, overwrite)
    train_documents, val_documents = split_documents(documents, val_fraction)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / META_FILENAME).unlink(missing_ok=True)  # the old dataset stops being valid now
    text_tokenizer = _build_tokenizer(tokenizer, vocab_size, train_documents)
    tokenizer_file = None
    if text_tokenizer.kind == "bpe":
        text_tokenizer.save(output_dir / TOKENIZER_FILENAME)
        tokenizer_file = TOKENIZER_FILENAME
    else:
        (output_dir / TOKENIZER_FILENAME).unlink(missing_ok=True)
    dtype_name = dtype_name_for_vocab(text_tokenizer.vocab_size)
    total_bytes = sum(d.num_bytes for d in documents)
    with tqdm(total=total_bytes, unit="B", unit_scale=True, desc=f"tokenize ({tokenizer})",
              disable=not progress) as progress_bar:
        splits = {split: _write_split(output_dir, split, split_documents_, text_tokenizer,
                                      dtype_name, progress_bar)
                  for split, split_documents_ in (("train", train_documents),
                                                  ("val", val_documents))}
    write_meta(output_dir, {
        "format": FORMAT_NAME, "version": FORMAT_VERSION, "dtype": dtype_name,
        "vocab_size": text_tokenizer.vocab_size, "eos_id": text_tokenizer.eos_id,
        "tokenizer": {"kind": text_tokenizer.kind, "file": tokenizer_file},
        "splits": splits, "source": source,
    })
    return output_dir
