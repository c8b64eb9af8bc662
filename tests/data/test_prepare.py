"""prepare_dataset and the CLI: determinism, document split, overwrite protection."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fp8train.data import TokenFile, prepare_dataset
from fp8train.data.builder import collect_files

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_collect_files_sorted_recursive_and_globbed(corpus_dir):
    files = collect_files([corpus_dir])
    relative = [p.relative_to(corpus_dir).as_posix() for p in files]
    assert relative[0] == "doc_01.py" and "sub/doc_00.py" in relative
    assert "ignored.bin" not in relative and len(relative) == 12
    assert collect_files([corpus_dir / "ignored.bin"]) == [corpus_dir / "ignored.bin"]


def test_prepare_is_deterministic(corpus_dir, tmp_path):
    first = prepare_dataset([corpus_dir], tmp_path / "a", progress=False, val_fraction=0.25)
    second = prepare_dataset([corpus_dir], tmp_path / "b", progress=False, val_fraction=0.25)
    for name in ("train.bin", "val.bin"):
        assert (first / name).read_bytes() == (second / name).read_bytes()


def test_val_fraction_is_respected_by_whole_documents(corpus_dir, tmp_path):
    dataset = prepare_dataset([corpus_dir], tmp_path / "d", val_fraction=0.3, progress=False)
    train, val = TokenFile(dataset, "train"), TokenFile(dataset, "val")
    share = val.num_tokens / (train.num_tokens + val.num_tokens)
    assert 0.3 <= share < 0.6
    no_val = prepare_dataset([corpus_dir], tmp_path / "e", val_fraction=0.0, progress=False)
    assert TokenFile(no_val, "val").num_tokens == 0


def test_single_file_is_cut_at_a_line_boundary(tmp_path):
    source = tmp_path / "one.txt"
    source.write_text("".join(f"line {i}\n" for i in range(1000)))
    dataset = prepare_dataset([source], tmp_path / "d", val_fraction=0.1, progress=False)
    train, val = TokenFile(dataset, "train"), TokenFile(dataset, "val")
    text = (train.tokenizer().decode(train.read(0, train.num_tokens))
            + val.tokenizer().decode(val.read(0, val.num_tokens)))
    train_text, val_text, tail = text.split("<|endoftext|>")
    assert train_text + val_text == source.read_text() and tail == ""
    assert train_text.endswith("\n") and val_text.startswith("line ")
    assert 0.08 < len(val_text) / len(text) < 0.12
    assert val.num_tokens > 0


def test_max_bytes_caps_input(corpus_dir, tmp_path):
    dataset = prepare_dataset([corpus_dir], tmp_path / "d", max_bytes=1000, val_fraction=0.0,
                              progress=False)
    train = TokenFile(dataset, "train")
    assert train.num_tokens - int((train.read(0, train.num_tokens) == train.eos_id).sum()) == 1000


def test_refuses_to_overwrite_a_different_dataset(corpus_dir, tmp_path):
    output = prepare_dataset([corpus_dir], tmp_path / "d", progress=False)
    meta_before = (output / "meta.json").read_text()
    with pytest.raises(ValueError, match=f"{output}.*--overwrite"):
        prepare_dataset([corpus_dir], output, val_fraction=0.5, progress=False)
    assert (output / "meta.json").read_text() == meta_before  # nothing was touched
    prepare_dataset([corpus_dir], output, progress=False)  # same request: allowed
    prepare_dataset([corpus_dir], output, val_fraction=0.5, overwrite=True, progress=False)
    assert json.loads((output / "meta.json").read_text())["source"].endswith("max_bytes=None")


def test_refuses_non_dataset_folder_and_bad_options(corpus_dir, tmp_path):
    with pytest.raises(ValueError, match="not empty"):
        prepare_dataset([corpus_dir], corpus_dir, progress=False)
    with pytest.raises(ValueError, match="'wordpiece'"):
        prepare_dataset([corpus_dir], tmp_path / "x", tokenizer="wordpiece", progress=False)
    with pytest.raises(ValueError, match="val_fraction"):
        prepare_dataset([corpus_dir], tmp_path / "x", val_fraction=1.0, progress=False)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        prepare_dataset([tmp_path / "missing.txt"], tmp_path / "x", progress=False)
    with pytest.raises(ValueError, match=r"\*.rs"):
        prepare_dataset([corpus_dir], tmp_path / "x", glob="*.rs", progress=False)


def test_cli_writes_dataset_and_reports_errors(corpus_dir, tmp_path):
    command = [sys.executable, "-m", "fp8train.data.prepare", "--input", str(corpus_dir),
               "--output", str(tmp_path / "cli"), "--quiet"]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "train:" in result.stdout and TokenFile(tmp_path / "cli", "val").num_tokens > 0
    result = subprocess.run(command[:4] + [str(tmp_path / "nope")] + command[5:],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "nope" in result.stderr
