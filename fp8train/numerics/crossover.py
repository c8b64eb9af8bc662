"""Crossover tables: where FP8 pays, per GPU kind and recipe class, as measured data (YAML).

A layer's FP8 forward+backward beats BF16 only when its GEMMs are large enough to hide the casts
(and, in eager mode, the host time): on an H100, 16384 tokens x 4096 -> 4096 gains 1.2-1.4x while
4096 x 2048 -> 2048 loses. A crossover table holds measured speedups (BF16 time / FP8 time, forward
+ backward of one linear layer, BF16 in the same run) for GEMM shapes on one GPU kind, per recipe
class; the precision policy (precision_policy.py) reads it to keep losing layers in BF16.

    recipes/crossover/<device>.yaml     shipped tables (committed measurements)
    <cache>/crossover/<device>-torch<version>.yaml   start-up calibrations (calibration.py)

File format (one device, several recipe classes):

    device: NVIDIA H100 80GB HBM3      # torch.cuda.get_device_name() of the measuring GPU
    match: H100                        # a GPU whose name contains this uses the table
    torch: 2.11.0+cu130
    method: "fwd+bwd, CUDA graphs, median of 20 (fp8train.numerics.calibration)"
    source: "scripts/gpu/dense.sh"
    classes:
      delayed:                         # recipe_class(recipe): the recipe's scaling
        - {tokens: 16384, in: 2048, out: 5632, bf16_ms: 1.41, fp8_ms: 1.12, speedup: 1.26}

MoE expert layers (GroupedLinear) have their own classes, `grouped:<recipe class>`: one grouped
GEMM per pass for all experts is another kernel than a dense GEMM, so a dense row says nothing
about it. Their rows hold the rows of the grouped GEMM over all experts (tokens x top_k), in and
out, and the speedup of the whole MoE block forward+backward that benchmarks/bench_moe.py measured
(--crossover-out); a block's two expert shapes (d -> hidden, hidden -> d) share its speedup.

Shapes not in the table are estimated by interpolating the speedup linearly in log2 of the GEMM
FLOPs between the two nearest measured sizes (clamped at the ends): FP8's gain grows with GEMM
size, which is what the table records. The estimate says how it was obtained.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from fp8train.numerics.recipe import RECIPES_DIR, Recipe

CROSSOVER_DIR = RECIPES_DIR / "crossover"


def recipe_class(recipe: Recipe) -> str:
    """The key of a recipe in a crossover table: its scaling ('delayed', 'current', 'rowwise',
    'blockwise'), or the three roles' scalings joined by '/' when they differ."""
    scalings = [recipe.role(role).scaling for role in ("input", "weight", "grad_output")]
    return scalings[0] if len(set(scalings)) == 1 else "/".join(scalings)


def grouped_class(klass: str) -> str:
    """The table class of MoE expert layers (grouped GEMMs) for the recipe class `klass`."""
    return f"grouped:{klass}"


@dataclass(frozen=True, order=True)
class GemmShape:
    """One linear layer's GEMMs: Y[tokens, out] = X[tokens, in] W[out, in]^T, plus its backward."""

    tokens: int
    in_features: int
    out_features: int

    @property
    def flops(self) -> float:
        return 6.0 * self.tokens * self.in_features * self.out_features  # 3 GEMMs, 2 FLOP per MAC

    def __str__(self) -> str:
        return f"{self.in_features}->{self.out_features} at {self.tokens} tokens"


@dataclass(frozen=True)
class Measurement:
    shape: GemmShape
    speedup: float  # BF16 time / FP8 time
    bf16_ms: float | None = None
    fp8_ms: float | None = None

    def to_dict(self) -> dict:
        out = {"tokens": self.shape.tokens, "in": self.shape.in_features, "out": self.shape.out_features}
        out.update({k: round(v, 4) for k, v in (("bf16_ms", self.bf16_ms), ("fp8_ms", self.fp8_ms)) if v is not None})
        out["speedup"] = round(self.speedup, 3)
        return out

    @classmethod
    def from_dict(cls, raw: dict, where: str) -> "Measurement":
        try:
            shape = GemmShape(int(raw["tokens"]), int(raw["in"]), int(raw["out"]))
            speedup = float(raw["speedup"])
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{where}: each measurement needs tokens, in, out and speedup numbers, "
                             f"got {raw!r} ({error})") from None
        if not speedup > 0:
            raise ValueError(f"{where}: speedup must be > 0, got {speedup}")
        return cls(shape, speedup, raw.get("bf16_ms"), raw.get("fp8_ms"))


@dataclass(frozen=True)
class CrossoverTable:
    device: str
    recipe_class: str
    measurements: tuple[Measurement, ...]
    source: str = ""
    method: str = ""

    def estimate(self, shape: GemmShape) -> tuple[float, str]:
        """(speedup, how it was obtained: 'measured' or 'estimated from ...')."""
        for m in self.measurements:
            if m.shape == shape:
                return m.speedup, "measured"
        if not self.measurements:
            raise ValueError(f"crossover table for {self.device} / {self.recipe_class} has no measurements")
        points = sorted(((math.log2(m.shape.flops), m) for m in self.measurements), key=lambda p: p[0])
        x = math.log2(shape.flops)
        below = [p for p in points if p[0] <= x]
        above = [p for p in points if p[0] > x]
        if not below or not above:
            nearest = above[0][1] if not below else below[-1][1]
            return nearest.speedup, f"estimated (beyond the measured sizes; nearest {nearest.shape})"
        (x0, m0), (x1, m1) = below[-1], above[0]
        t = (x - x0) / (x1 - x0) if x1 > x0 else 0.0
        speedup = m0.speedup + t * (m1.speedup - m0.speedup)
        return speedup, f"estimated (between measured {m0.shape} and {m1.shape})"


@dataclass(frozen=True)
class CrossoverFile:
    device: str
    match: str
    torch: str
    method: str
    source: str
    tables: dict[str, CrossoverTable]

    def to_dict(self) -> dict:
        return {"device": self.device, "match": self.match, "torch": self.torch, "method": self.method,
                "source": self.source,
                "classes": {name: [m.to_dict() for m in sorted(t.measurements, key=lambda m: m.shape)]
                            for name, t in sorted(self.tables.items())}}


def parse_crossover(raw: dict, where: str) -> CrossoverFile:
    if not isinstance(raw, dict) or not isinstance(raw.get("classes"), dict) or not raw.get("device"):
        raise ValueError(f"{where}: a crossover table needs 'device' and 'classes: {{recipe class: [...]}}'")
    device, method, source = str(raw["device"]), str(raw.get("method", "")), str(raw.get("source", ""))
    tables = {}
    for name, rows in raw["classes"].items():
        measurements = tuple(Measurement.from_dict(r, f"{where}: classes.{name}") for r in rows or ())
        tables[str(name)] = CrossoverTable(device, str(name), measurements, source or where, method)
    return CrossoverFile(device, str(raw.get("match") or device), str(raw.get("torch", "")), method,
                         source, tables)


def load_crossover(path: Path) -> CrossoverFile:
    return parse_crossover(yaml.safe_load(Path(path).read_text()), str(path))


def save_crossover(path: Path, crossover: CrossoverFile) -> Path:
    """Write atomically (a temporary file renamed over the old one: a reader never sees half)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f"{path.suffix}.{os.getpid()}.tmp")  # ranks of one node may write at once
    tmp.write_text(yaml.safe_dump(crossover.to_dict(), sort_keys=False, width=120))
    tmp.replace(path)
    return path


def shipped_crossovers(directory: Path = CROSSOVER_DIR) -> list[CrossoverFile]:
    return [load_crossover(p) for p in sorted(Path(directory).glob("*.yaml"))]


def find_table(crossovers: list[CrossoverFile], device_name: str, klass: str) -> CrossoverTable | None:
    """The first table whose `match` is contained in the device name and that has this recipe class."""
    for crossover in crossovers:
        if crossover.match.lower() in device_name.lower() and klass in crossover.tables:
            return crossover.tables[klass]
    return None
