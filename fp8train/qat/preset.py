"""A QAT preset as data: conf/qat/<name>.yaml -> QATPreset (unknown keys and values are errors).

    name: w4_g128
    description: "INT4 weights, asymmetric, one scale + zero point per 1x128 group (RTN-W4 g128)"
    weight: {format: uint4, granularity: tile, group_size: 128, symmetric: false}   # a QuantSpec
    input: null                # or {format: int8, granularity: row} (W8A8: per-token INT8)

`weight` and `input` are fp8train.quant.QuantSpec, the same quantizer data the PTQ presets
(conf/quant/*.yaml) use, so the model is trained against exactly the grid it is exported with:
QAT's W4 g128 preset equals PTQ's RTN W4 g128 preset field for field. A new preset is a new file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from fp8train.quant.config_values import preset_file
from fp8train.quant.spec import QuantSpec

PRESETS_DIR = Path(__file__).resolve().parents[2] / "conf" / "qat"
_KEYS = ("name", "description", "weight", "input")


@dataclass(frozen=True)
class QATPreset:
    """Which operands of each linear layer are fake-quantized during training, and how."""

    name: str
    weight: QuantSpec | None = None
    input: QuantSpec | None = None
    description: str = ""

    def describe(self) -> str:
        parts = [f"{role} {spec.describe()}" for role, spec in (("weight", self.weight), ("input", self.input))
                 if spec is not None]
        return f"QAT preset {self.name!r}: " + ", ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description,
                "weight": None if self.weight is None else self.weight.to_dict(),
                "input": None if self.input is None else self.input.to_dict()}


def preset_from_dict(raw: Any) -> QATPreset:
    """Build and validate a QATPreset from plain data (a parsed YAML file or a Hydra node)."""
    if not isinstance(raw, dict):
        raise ValueError(f"a QAT preset must be a mapping with keys {list(_KEYS)}, got {raw!r}")
    unknown = sorted(set(raw) - set(_KEYS))
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in QAT preset {raw.get('name', '?')!r}; "
                         f"allowed keys: {list(_KEYS)}")
    name = raw.get("name")
    if not name:
        raise ValueError("a QAT preset needs a 'name'")
    specs = {role: None if raw.get(role) is None else QuantSpec.from_dict(dict(raw[role]), f"qat.{role}")
             for role in ("weight", "input")}
    if specs["weight"] is None and specs["input"] is None:
        raise ValueError(f"QAT preset {name!r} quantizes nothing: give 'weight' and/or 'input' "
                         f"(e.g. weight: {{format: uint4, granularity: tile, group_size: 128, symmetric: false}})")
    return QATPreset(name=str(name), description=str(raw.get("description") or ""), **specs)


def list_presets(directory: Path = PRESETS_DIR) -> list[str]:
    return sorted(p.stem for p in directory.glob("*.yaml"))


def load_preset(name_or_path: str | Path, directory: Path = PRESETS_DIR) -> QATPreset:
    """A preset by name (conf/qat/<name>.yaml) or a preset YAML file by path."""
    return preset_from_dict(yaml.safe_load(preset_file(name_or_path, directory, "QAT preset").read_text()))
