"""The stdlib default corpus: file selection, caching, and safety under concurrent callers."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import time
from pathlib import Path

from fp8train.data import TokenFile, ensure_default_corpus
from fp8train.data.default_corpus import _prepare_into_place, stdlib_source_files

REPO_ROOT = Path(__file__).resolve().parents[2]
SMALL = 200_000  # bytes: keeps each prepare well under a second
CHILD = ("import sys; from fp8train.data import ensure_default_corpus, TokenFile; "
         "print('imported', file=sys.stderr, flush=True); "
         "d = ensure_default_corpus(sys.argv[1], max_bytes=int(sys.argv[2])); "
         "print(d, TokenFile(d, 'train', verify=True).sha256, TokenFile(d, 'val').sha256)")


def _start_child(cache_dir: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    return subprocess.Popen([sys.executable, "-c", CHILD, str(cache_dir), str(SMALL)],
                            cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _finish(child: subprocess.Popen) -> str:
    stdout, stderr = child.communicate(timeout=120)
    assert child.returncode == 0, stderr
    return stdout.strip()


def test_stdlib_files_are_sorted_and_skip_tests_and_site_packages():
    files = stdlib_source_files()
    assert files and all(path.suffix == ".py" for path in files)
    parts = {part for path in files for part in path.parts}
    assert not parts & {"site-packages", "test", "tests", "__pycache__"}
    assert any(path.name == "os.py" for path in files)


def test_prepares_once_and_is_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("FP8TRAIN_CACHE", str(tmp_path))
    dataset = ensure_default_corpus(max_bytes=SMALL)
    version = f"{sys.version_info.major}{sys.version_info.minor}"
    assert dataset == tmp_path / "corpus" / f"stdlib-py{version}-byte-{SMALL}"
    train = TokenFile(dataset, "train", verify=True)
    assert train.vocab_size == 257 and TokenFile(dataset, "val").num_tokens > 0
    text_tokens = 0
    for token_file in (train, TokenFile(dataset, "val")):
        tokens = token_file.read(0, token_file.num_tokens)
        text_tokens += int((tokens != token_file.eos_id).sum())
    assert SMALL - 4 <= text_tokens <= SMALL  # capped at max_bytes (a cut char may drop)
    modified = (dataset / "meta.json").stat().st_mtime_ns
    assert ensure_default_corpus(tmp_path, max_bytes=SMALL) == dataset
    assert (dataset / "meta.json").stat().st_mtime_ns == modified  # not rebuilt


def test_two_processes_on_an_empty_cache_get_the_same_complete_dataset(tmp_path):
    children = [_start_child(tmp_path), _start_child(tmp_path)]
    outputs = [_finish(child) for child in children]
    assert outputs[0] == outputs[1]
    leftovers = sorted(p.name for p in (tmp_path / "corpus").iterdir())
    assert leftovers == [f"stdlib-py{sys.version_info.major}{sys.version_info.minor}"
                         f"-byte-{SMALL}", f"stdlib-py{sys.version_info.major}"
                         f"{sys.version_info.minor}-byte-{SMALL}.lock"]


def test_a_waiting_process_uses_the_holder_s_dataset(tmp_path):
    """Hold the lock as 'rank 0' would: the child must wait, then reuse what rank 0 built."""
    corpus_root = tmp_path / "corpus"
    corpus_root.mkdir()
    dataset = corpus_root / f"stdlib-py{sys.version_info.major}{sys.version_info.minor}-byte-{SMALL}"
    with open(corpus_root / f"{dataset.name}.lock", "w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        child = _start_child(tmp_path)
        assert child.stderr.readline().strip() == "imported"
        time.sleep(1.0)  # the child is now inside ensure_default_corpus, waiting on the lock
        assert child.poll() is None and not dataset.exists()  # blocked, wrote nothing
        _prepare_into_place(dataset, SMALL, progress=False)
        inode = dataset.stat().st_ino
        fcntl.flock(lock_file, fcntl.LOCK_UN)
    assert _finish(child).startswith(str(dataset))
    assert dataset.stat().st_ino == inode  # the child did not rebuild it
