"""The quantization plan: which quantizer each linear gets (mixed precision), as an editable file.

    default: {weight: {format: uint4, granularity: tile, group_size: 64, symmetric: false}}
    layers:                                     # overrides by full module name
      layers.0.mlp.down_proj: {weight: {format: int8, granularity: row}}
      layers.5.attn.q_proj: null                # keep in high precision

`greedy_plan` builds one from a sensitivity table: every layer starts at the low quantizer; units
are promoted to the high one in order of loss saved per extra bit until the average code bits
(weighted by parameter count; scale/zero overhead not counted; a kept layer counts 16) would exceed
the budget. A unit is a fused group (fused_groups.py: q/k/v_proj, gate/up_proj of one block, which
serving engines run as one matmul with one quantizer) or, with `fuse_groups=False`, a single layer.
A group's gain is the sum of its members' measured gains (each measured with that layer ALONE
quantized low: interactions inside the group are ignored, as they are between any two layers) and
its cost the sum of their sizes. Save it, edit it, re-apply it with `plan=path`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fp8train.ptq.fused_groups import fused_groups, scheme_key, split_groups
from fp8train.quant.spec import QuantSpec

KEPT_BITS = 16


@dataclass(frozen=True)
class LayerPlan:
    weight: QuantSpec
    input: QuantSpec | None = None

    @property
    def bits(self) -> int:
        return self.weight.bits

    def to_dict(self) -> dict:
        return {"weight": self.weight.to_dict(), "input": None if self.input is None else self.input.to_dict()}

    @classmethod
    def from_dict(cls, raw, where: str) -> "LayerPlan | None":
        if raw is None:
            return None
        if not isinstance(raw, dict) or "weight" not in raw or set(raw) - {"weight", "input"}:
            raise ValueError(f"{where} must be null or {{weight: QUANTSPEC, input: QUANTSPEC or null}}, got {raw!r}")
        weight = QuantSpec.from_dict(dict(raw["weight"]), f"{where}.weight")
        inp = raw.get("input")
        return cls(weight, None if inp is None else QuantSpec.from_dict(dict(inp), f"{where}.input"))


@dataclass
class QuantPlan:
    default: LayerPlan | None
    layers: dict[str, LayerPlan | None]

    def for_layer(self, name: str) -> LayerPlan | None:
        return self.layers[name] if name in self.layers else self.default

    def average_bits(self, sizes: dict[str, int]) -> float:
        """Parameter-weighted mean code bits over the linears in `sizes` (name -> numel)."""
        total = sum(sizes.values())
        bits = sum(n * (KEPT_BITS if (p := self.for_layer(name)) is None else p.bits) for name, n in sizes.items())
        return bits / total

    def split_groups(self, names) -> list[tuple[str, ...]]:
        """The fused groups among `names` whose members this plan quantizes differently."""
        return split_groups({name: None if (p := self.for_layer(name)) is None else scheme_key(p.weight, p.input)
                             for name in names})

    def to_dict(self) -> dict:
        return {"default": None if self.default is None else self.default.to_dict(),
                "layers": {k: None if v is None else v.to_dict() for k, v in self.layers.items()}}

    @classmethod
    def from_dict(cls, raw) -> "QuantPlan":
        if not isinstance(raw, dict) or set(raw) - {"default", "layers"}:
            raise ValueError(f"a plan is a mapping with keys 'default' and 'layers', got {raw!r}")
        layers = raw.get("layers") or {}
        return cls(LayerPlan.from_dict(raw.get("default"), "default"),
                   {name: LayerPlan.from_dict(v, f"layers.{name}") for name, v in layers.items()})

    def save(self, path: str | Path) -> Path:
        import yaml

        path = Path(path)
        path.write_text("# fp8train quantization plan: edit and re-apply with plan=" + str(path) + "\n"
                        + yaml.safe_dump(self.to_dict(), sort_keys=False))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "QuantPlan":
        import yaml

        path = Path(path)
        if not path.is_file():
            raise ValueError(f"plan file {path} does not exist")
        try:
            return cls.from_dict(yaml.safe_load(path.read_text()))
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None

    def check_layers(self, known: set[str]) -> None:
        unknown = sorted(set(self.layers) - known)
        if unknown:
            raise ValueError(f"the plan names layers the model does not have: {unknown[:5]}; "
                             f"quantizable layers look like {sorted(known)[:3]}")


def uniform_plan(weight: QuantSpec, input: QuantSpec | None = None) -> QuantPlan:
    return QuantPlan(LayerPlan(weight, input), {})


def _promotion_units(rows: list[dict], fuse_groups: bool) -> list[dict]:
    """One unit per fused group (or per layer): its members, summed numel and loss increases."""
    by_name = {row["layer"]: row for row in rows}
    if len(by_name) != len(rows):
        raise ValueError("sensitivity rows name a layer twice; one row per layer")
    groups = fused_groups(by_name) if fuse_groups else [(name,) for name in by_name]
    return [{"layers": group, "numel": sum(by_name[n]["numel"] for n in group),
             "delta_low": sum(by_name[n]["delta_low"] for n in group),
             "delta_high": sum(by_name[n]["delta_high"] for n in group)} for group in groups]


def greedy_plan(rows: list[dict], low: LayerPlan, high: LayerPlan, budget_bits: float,
                fuse_groups: bool = True) -> QuantPlan:
    """rows: {'layer', 'numel', 'delta_low', 'delta_high'} (loss increase with each quantizer).

    fuse_groups: promote each fused group (q/k/v_proj, gate/up_proj) as a whole, so the plan never
    gives a group's members different quantizers (what vLLM/SGLang need); False: layer by layer."""
    if budget_bits < low.bits:
        raise ValueError(f"budget of {budget_bits} average bits is below the low quantizer's {low.bits} bits")
    extra = high.bits - low.bits
    if extra <= 0:
        raise ValueError(f"the high quantizer ({high.weight.describe()}, {high.bits} bits) must have more bits "
                         f"than the low one ({low.weight.describe()}, {low.bits} bits)")
    units = _promotion_units(rows, fuse_groups)
    total = sum(unit["numel"] for unit in units)
    bits = low.bits * total
    order = sorted(units, key=lambda u: (u["delta_low"] - u["delta_high"]) / (extra * u["numel"]), reverse=True)
    layers: dict[str, LayerPlan | None] = {}
    for unit in order:
        if unit["delta_low"] <= unit["delta_high"]:
            break
        if bits + extra * unit["numel"] > budget_bits * total:
            continue
        bits += extra * unit["numel"]
        layers.update({name: high for name in unit["layers"]})
    return QuantPlan(low, layers)
