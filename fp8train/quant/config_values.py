"""Reading user config values with errors that name the setting and the allowed values.

One rule each, shared by recipes, quantizer specs, PTQ/QAT presets, the KV-cache mode and the
trainer's enum settings:

    parse_choice(RecipeScaling, "rowwse", "scaling")   # ValueError: scaling='rowwse' is not allowed; ...
    from_mapping(QuantSpec, raw, "weight")             # unknown keys are named with the allowed ones
    preset_file("w4_g128", PRESETS_DIR, "QAT preset")  # name -> <dir>/<name>.yaml, or a .yaml path
"""

from __future__ import annotations

import dataclasses
from enum import Enum
from pathlib import Path
from typing import Any, TypeVar

E = TypeVar("E", bound=Enum)
D = TypeVar("D")


def parse_choice(enum_cls: type[E], name: Any, where: str, lower: bool = False) -> E:
    """`name` as a member of `enum_cls` (a member passes through), or ValueError listing the values."""
    if isinstance(name, enum_cls):
        return name
    try:
        return enum_cls(str(name).lower() if lower else name)
    except ValueError:
        raise ValueError(f"{where}={name!r} is not allowed; choose one of "
                         f"{[m.value for m in enum_cls]}") from None


def check_mapping(cls, raw: Any, where: str, example: str = "") -> None:
    """raw must be a dict whose keys are fields of the dataclass `cls`."""
    if not isinstance(raw, dict):
        like = f" like {example}" if example else ""
        raise ValueError(f"{where} must be a mapping{like}, got {raw!r}")
    allowed = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in {where}; allowed keys: {sorted(allowed)}")


def preset_file(name_or_path: str | Path, directory: Path, what: str) -> Path:
    """A preset by name (<directory>/<name>.yaml) or a YAML file by path; ValueError naming the
    missing file and the available presets."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = directory / f"{name_or_path}.yaml"
    if not path.is_file():
        available = sorted(p.stem for p in directory.glob("*.yaml"))
        raise ValueError(f"unknown {what} {str(name_or_path)!r}: no file {path}; available presets: {available}")
    return path
