"""The trainer's side of the per-layer precision policy (fp8train.numerics.precision_policy).

    trainer.precision_policy: table       off | table | calibrate  (default table, see below)
    trainer.precision_min_speedup: 1.0    FP8 only where the measured speedup reaches this
    trainer.precision_calibration: streamed   how `calibrate` times: streamed | graphs

`table` decides from the crossover table shipped for this GPU kind (recipes/crossover/*.yaml): no
start-up cost, and a GPU without a table (or the CPU) keeps every eligible layer in FP8 as before,
with a note in the conversion report. `calibrate` measures this model's shapes on this GPU at
start-up (a few seconds per shape, cached per GPU and torch version under the data cache dir);
every rank measures its own GPU and the ranks keep the smallest speedup per shape, so all ranks
build the same model. `off` converts every eligible layer (the recipe as written).

Tokens per GEMM are the micro-batch's: micro_batch_size x seq_len (x top_k for MoE expert layers,
judged by the shipped `grouped:<class>` table of this GPU; without one they follow the recipe).

The decision is made once, when a run starts, and travels with every checkpoint
(`precision_policy.json`: the layers that run FP8). A resume builds exactly that model, whatever
this launch's policy, card or calibration cache would decide now: a calibrated layer near the
threshold, or a requeue onto another node, must not change the structure the weights were saved
in. Checkpoints older than this file are re-decided as before.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from fp8train.data.default_corpus import default_cache_dir
from fp8train.numerics.convert import default_filter
from fp8train.numerics.calibration import METHODS, calibrated_table, linear_shapes
from fp8train.numerics.crossover import CrossoverTable, shipped_crossovers
from fp8train.numerics.precision_policy import PolicyMode, PrecisionPolicy, policy_mode, shipped_policy
from fp8train.train import distributed
from fp8train.train.checkpoint import atomic_write

POLICY_FILE = "precision_policy.json"


def check_policy(trainer_cfg, device: torch.device) -> None:
    """Start-up check of the settings (config.resolve calls it)."""
    mode = policy_mode(trainer_cfg.precision_policy, "trainer.precision_policy")
    if trainer_cfg.precision_calibration not in METHODS:
        raise ValueError(f"trainer.precision_calibration={trainer_cfg.precision_calibration!r}: choose one of "
                         f"{sorted(METHODS)} (streamed: launch time counts; graphs: GPU time only)")
    if not trainer_cfg.precision_min_speedup > 0:
        raise ValueError(f"trainer.precision_min_speedup={trainer_cfg.precision_min_speedup} must be > 0")
    if mode is PolicyMode.CALIBRATE and device.type != "cuda":
        raise ValueError("trainer.precision_policy=calibrate times GEMMs on a CUDA GPU; on "
                         f"{device.type} use trainer.precision_policy=table or off")


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


class CheckpointLayers:
    """module_filter: FP8 for exactly the layers a checkpoint was trained with in FP8."""

    def __init__(self, layers: list[str], source: Path):
        self.layers, self.source = set(layers), source

    def __call__(self, fqn: str, module: nn.Module) -> bool | str:
        verdict = default_filter(fqn, module)
        if verdict is not True or fqn in self.layers:
            return verdict
        return "bf16: kept in high precision when the run started (its checkpoint's precision policy)"

    def notes(self) -> list[str]:
        return [f"precision policy: the {len(self.layers)} FP8 layer(s) recorded in {self.source} "
                "(decided when the run started; a resume never re-decides)"]


def save_fp8_layers(tag_dir: Path, layers: list[str], is_main: bool) -> None:
    """Record the run's FP8 layers in a checkpoint folder (rank 0, before the commit marker)."""
    if is_main:
        tag_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(tag_dir / POLICY_FILE, json.dumps({"fp8_layers": sorted(layers)}, indent=1))


def recorded_layers(tag_dir: Path) -> CheckpointLayers | None:
    """The FP8 layer set recorded in a checkpoint folder, or None (a checkpoint older than the file)."""
    path = Path(tag_dir) / POLICY_FILE
    if not path.is_file():
        return None
    return CheckpointLayers(json.loads(path.read_text())["fp8_layers"], path)


def checkpoint_layers(checkpoint_ref) -> CheckpointLayers | None:
    """recorded_layers of the checkpoint a run resumes from (None without one)."""
    return None if checkpoint_ref is None else recorded_layers(checkpoint_ref.path)


def build_policy(spec, model: nn.Module, log=lambda _: None) -> PrecisionPolicy | CheckpointLayers | None:
    """The module_filter for convert_to_fp8, or None (policy off, or FP8 disabled). A resume takes
    the layer set its checkpoint recorded."""
    cfg, recipe = spec.cfg, spec.recipe
    if not recipe.enabled:
        return None
    recorded = checkpoint_layers(spec.resume_from)
    if recorded is not None:
        return recorded
    mode = policy_mode(cfg.trainer.precision_policy, "trainer.precision_policy")
    if mode is PolicyMode.OFF:
        return None
    tokens = cfg.trainer.micro_batch_size * cfg.data.seq_len
    name = device_name(spec.device)
    policy = shipped_policy(name, recipe, tokens, cfg.trainer.precision_min_speedup, shipped_crossovers())
    if mode is PolicyMode.CALIBRATE:  # this GPU measured for the dense layers; MoE experts keep the shipped rows
        cache = Path(cfg.data.cache_dir).expanduser() if cfg.data.cache_dir else default_cache_dir()
        with torch.cuda.device(spec.device):
            table = calibrated_table(linear_shapes(model, tokens), recipe, cache, name, log=log,
                                     method=cfg.trainer.precision_calibration)
        policy.table, policy.unavailable = agree_across_ranks(table, spec.device), ""
    return policy


def agree_across_ranks(table: CrossoverTable, device: torch.device) -> CrossoverTable:
    """Every rank keeps the smallest speedup per shape: one decision, one model structure, everywhere."""
    rows = sorted(table.measurements, key=lambda m: m.shape)
    slowest = distributed.all_reduce([m.speedup for m in rows], "min", device)
    if slowest == [m.speedup for m in rows]:
        return table
    agreed = tuple(replace(m, speedup=s) for m, s in zip(rows, slowest))
    return replace(table, measurements=agreed, source=f"{table.source} (min over ranks)")


def no_fp8_warning(spec, policy, report) -> str | None:
    """A warning when the policy left an FP8 recipe with no FP8 layer at all (None otherwise).

    A user who asked for `+recipe=hybrid` and gets BF16 everywhere should not learn it from the
    throughput: session 7's GPU loss-gap study compared BF16 with BF16 this way (125M on an H200:
    no layer pays)."""
    # a resume (CheckpointLayers) was warned about when its run started
    if not isinstance(policy, PrecisionPolicy) or report.converted or not report.skipped:
        return None
    cfg = spec.cfg
    return (f"recipe {spec.recipe.name!r} trains NO layer in FP8: the precision policy "
            f"(trainer.precision_policy={cfg.trainer.precision_policy}) found no layer where FP8 reaches "
            f"{cfg.trainer.precision_min_speedup}x BF16 speed on {device_name(spec.device)} at {policy.tokens} "
            f"tokens per micro-batch, so every GEMM runs in high precision (reasons above). To train in FP8 "
            f"anyway (a numerics study, a loss comparison): trainer.precision_policy=off")
