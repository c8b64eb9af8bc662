"""Checkpoint checksums: what gets loaded is what was written.

At save time, once every rank's files are on disk, each file of the tag folder is hashed (sha256)
and the manifest

    {"mp_rank_00_model_states.pt": {"bytes": 1005553, "sha256": "9f2c..."}, ...}

goes into fp8train_meta.json, the file written last (checkpoint.py). The files are split across
ranks, so a large checkpoint hashes in parallel. Two checks use the manifest:

    size_problems  a stat per file, no reading: catches the common damage (a truncated or missing
                   file) in `resolve`, before any work
    verify         re-hashes every file (split across ranks, collective) before DeepSpeed loads,
                   so a flipped byte is reported by file name instead of as a zip-archive error

Each returns a list of problems ("mp_rank_00_model_states.pt has 100000 bytes, 1005553 were
written"), empty when the checkpoint is intact. Checkpoints written before manifests existed
have none and pass both checks as they are.
"""

from __future__ import annotations

from pathlib import Path

from fp8train.data.token_file import file_sha256
from fp8train.train import distributed

MANIFEST_KEY = "files"


def tag_files(folder: Path, exclude: tuple[str, ...]) -> list[str]:
    """Relative paths of the regular files under `folder`, sorted; hidden temporaries skipped."""
    names = (p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    return sorted(n for n in names if n not in exclude and not Path(n).name.startswith("."))


def _hash(folder: Path, names: list[str]) -> dict[str, dict]:
    return {name: {"bytes": (folder / name).stat().st_size, "sha256": file_sha256(folder / name)}
            for name in names}


def build_manifest(folder: Path, rank: int, world_size: int, exclude: tuple[str, ...]) -> dict:
    """Collective: every rank hashes every world_size-th file; all ranks get the whole manifest."""
    names = tag_files(folder, exclude)
    merged: dict[str, dict] = {}
    for part in distributed.gather_objects(_hash(folder, names[rank::world_size])):
        merged.update(part)
    return dict(sorted(merged.items()))


def size_problems(folder: Path, manifest: dict | None) -> list[str]:
    """Missing files and files whose size differs from the manifest (no file is read)."""
    problems = []
    for name, entry in (manifest or {}).items():
        path = folder / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif path.stat().st_size != entry["bytes"]:
            problems.append(f"{name} has {path.stat().st_size} bytes, {entry['bytes']} were written")
    return problems


def verify(folder: Path, manifest: dict | None, rank: int, world_size: int) -> list[str]:
    """Collective: size problems, then a sha256 check of every file (split across ranks)."""
    problems = size_problems(folder, manifest)
    if problems or not manifest:
        return problems
    names = sorted(manifest)[rank::world_size]
    mine = [f"{name} does not match the sha256 recorded when it was written"
            for name in names if file_sha256(folder / name) != manifest[name]["sha256"]]
    return sorted(p for part in distributed.gather_objects(mine) for p in part)
