"""The default corpus: the running Python's own standard library sources.

Every machine that can run fp8train has them, so a first training run needs no download and no
data flag. The corpus is the stdlib's *.py files (site-packages and test folders skipped), in
sorted path order, capped at `max_bytes`, byte-tokenized. It differs between Python versions,
so the cache folder name carries the version:

    ${FP8TRAIN_CACHE:-~/.cache/fp8train}/corpus/stdlib-py311-byte-6000000/

Several processes (all torchrun ranks) call `ensure_default_corpus` at once. The first to take
an exclusive `fcntl.flock` on a lock file beside the folder prepares the dataset in a temporary
folder and renames it into place; the others block on the lock, then find the finished folder.
Because the rename is atomic, a folder under the final name is always complete, so the common
case (already prepared) returns without locking at all.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import sys
import sysconfig
import time
from pathlib import Path

from fp8train.data.builder import prepare_dataset
from fp8train.data.token_file import META_FILENAME, TokenFile

DEFAULT_MAX_BYTES = 6_000_000
SKIPPED_STDLIB_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test",
                       "__pycache__"}


def default_cache_dir() -> Path:
    return Path(os.environ.get("FP8TRAIN_CACHE") or Path.home() / ".cache" / "fp8train")


def stdlib_source_files() -> list[Path]:
    """The stdlib *.py files in sorted order, without site-packages and test folders."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for root, dir_names, file_names in os.walk(stdlib):
        dir_names[:] = sorted(name for name in dir_names
                              if name not in SKIPPED_STDLIB_DIRS and not name.startswith("."))
        files.extend(Path(root) / name for name in sorted(file_names) if name.endswith(".py"))
    if not files:
        raise FileNotFoundError(f"no *.py files under the standard library folder {stdlib}; "
                                f"this Python ships a zipped or stripped stdlib, so prepare "
                                f"your own data with `python -m fp8train.data.prepare`")
    return files


def default_corpus_name(max_bytes: int) -> str:
    return f"stdlib-py{sys.version_info.major}{sys.version_info.minor}-byte-{max_bytes}"


def _is_complete(dataset_dir: Path) -> bool:
    try:
        TokenFile(dataset_dir, "train")
        TokenFile(dataset_dir, "val")
    except (FileNotFoundError, ValueError):
        return False
    return True


def _prepare_into_place(dataset_dir: Path, max_bytes: int, progress: bool) -> None:
    """Called with the lock held: build in a temporary folder, then rename atomically."""
    if dataset_dir.exists():  # a damaged copy (e.g. a disk-full write): keep it aside
        dataset_dir.rename(dataset_dir.with_name(f"{dataset_dir.name}.damaged-{int(time.time())}"))
    tmp_dir = dataset_dir.with_name(f".{dataset_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    source = (f"python-stdlib {sys.version.split()[0]} {sysconfig.get_paths()['stdlib']} "
              f"*.py without site-packages/tests, sorted, max_bytes={max_bytes}")
    try:
        prepare_dataset(stdlib_source_files(), tmp_dir, tokenizer="byte", val_fraction=0.05,
                        max_bytes=max_bytes, source=source, progress=progress)
        os.rename(tmp_dir, dataset_dir)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def ensure_default_corpus(cache_dir: str | os.PathLike | None = None,
                          max_bytes: int = DEFAULT_MAX_BYTES, progress: bool = False) -> Path:
    """Prepare the stdlib corpus once (safe across concurrent processes); return its folder."""
    if max_bytes <= 0:
        raise ValueError(f"max_bytes must be positive, got {max_bytes}")
    corpus_root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    corpus_root = corpus_root / "corpus"
    dataset_dir = corpus_root / default_corpus_name(max_bytes)
    if (dataset_dir / META_FILENAME).is_file() and _is_complete(dataset_dir):
        return dataset_dir
    corpus_root.mkdir(parents=True, exist_ok=True)
    with open(corpus_root / f"{dataset_dir.name}.lock", "w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)  # blocks until whoever prepares has finished
        try:
            if not _is_complete(dataset_dir):
                _prepare_into_place(dataset_dir, max_bytes, progress)
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)
    return dataset_dir
