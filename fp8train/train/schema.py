"""Typed schemas for the Hydra configuration, registered in Hydra's ConfigStore.

Two config layers (see docs/ARCHITECTURE.md): this file is the *plain values* layer. Every YAML
file in conf/ is merged onto `TrainConfig`, so OmegaConf checks each key and each type before
any work starts:

    python launch/train.py trainer.max_stepz=5      ->  Key 'max_stepz' not in 'TrainerConfig'
    python launch/train.py trainer.max_steps=five   ->  Value 'five' of type 'str' could not be
                                                        converted to Integer

`fp8train.train.config.resolve` then turns the validated values into runtime objects (a Recipe,
a DeepSpeed dict, dataset paths) and checks the rules that span several fields.

The FP8 recipes are data files owned by the numerics core (recipes/*.yaml). `register_recipes`
stores each one as an option of the `recipe` group, so `+recipe=v3_fp8` selects a preset and
`recipe.weight.format=e5m2` edits it; the recipe's own keys are validated by
`fp8train.numerics.recipe_from_dict` during `resolve`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

SCHEMA_NAME = "fp8train_schema"


class Precision(str, Enum):
    """DeepSpeed's working precision for parameters and activations (master weights stay FP32)."""

    bf16 = "bf16"
    fp16 = "fp16"  # dynamic loss scaling; GPU only
    fp32 = "fp32"


class OnDivergence(str, Enum):
    """What a run does after trainer.max_bad_steps consecutive non-finite steps (fp8train/train/divergence.py).

    Every non-finite step is skipped (never applied) whatever the choice; this picks what follows."""

    stop = "stop"  # the first non-finite step stops the run (error, exit code 3)
    skip = "skip"  # skip non-finite steps; max_bad_steps of them in a row stop the run
    rollback = "rollback"  # after max_bad_steps in a row: reload the last good checkpoint, skip that data


class WandbMode(str, Enum):
    online = "online"
    offline = "offline"  # writes <run_dir>/wandb/offline-run-*; upload later with `wandb sync`
    disabled = "disabled"


@dataclass
class ModelConfig:
    """A named size from fp8train.models.MODEL_SIZES plus field overrides (e.g. n_layers: 4)."""

    size: str = "tiny"
    max_seq_len: Optional[int] = None  # None: data.seq_len
    overrides: Dict[str, Any] = field(default_factory=dict)


@dataclass
class DataConfig:
    """`path: default` is the embedded standard-library corpus, prepared on first use."""

    path: str = "default"
    seq_len: int = 128
    default_corpus_bytes: int = 6_000_000
    cache_dir: Optional[str] = None  # None: $FP8TRAIN_CACHE or ~/.cache/fp8train
    verify_sha256: bool = False  # re-hash the token files at startup (reads them fully)
    val_batch_size: int = 8  # sequences per rank per validation batch
    val_batches: int = 8  # batches per evaluation


@dataclass
class OptimConfig:
    """AdamW with linear warmup then cosine decay to min_lr_ratio * lr."""

    lr: float = 3e-3
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1
    warmup_steps: int = 20
    decay_steps: Optional[int] = None  # schedule horizon; None: trainer.max_steps
    min_lr_ratio: float = 0.1
    fused: Optional[bool] = None  # None: fused AdamW on CUDA, foreach on CPU


@dataclass
class DeepSpeedConfig:
    precision: Precision = Precision.bf16
    zero_stage: int = 1
    fp32_grad_accum: bool = True  # data_types.grad_accum_dtype=fp32 (ZeRO >= 1 only)
    gradient_clipping: float = 1.0
    initial_scale_power: int = 16  # fp16 only: dynamic loss scale starts at 2**16
    loss_scale_window: int = 1000
    hysteresis: int = 2
    min_loss_scale: float = 1.0
    # more keys of DeepSpeed's zero_optimization section, by DeepSpeed's own names, checked against
    # DeepSpeed's schema at start-up: e.g. +deepspeed.zero_options.stage3_module_granularity_threshold=
    # 1000000 (fewer ZeRO-3 module hooks: the host side of a ZeRO-3 step, docs/PERFORMANCE.md)
    zero_options: Dict[str, Any] = field(default_factory=dict)


@dataclass
class LoggerConfig:
    mode: WandbMode = WandbMode.offline
    project: str = "fp8train"
    entity: Optional[str] = None
    name: Optional[str] = None  # None: the run id
    tags: List[str] = field(default_factory=list)
    progress_bar: bool = True
    log_every: int = 1  # optimizer steps between metrics.jsonl / wandb records
    verbose: bool = False  # also print DeepSpeed's start-up reports (MA ... Max_MA, CPU Virtual Memory)


class GuardMode(str, Enum):
    """What the FP8 health guard does when a layer crosses a threshold (docs/QUALITY.md)."""

    off = "off"  # no checks
    warn = "warn"  # log the promotion it would make, change nothing
    act = "act"  # promote the layer (delayed -> current -> blockwise -> BF16), log, checkpoint


@dataclass
class FP8GuardConfig:
    """trainer.fp8_guard: checks run on every FP8 telemetry step (trainer.fp8_telemetry_every)."""

    mode: GuardMode = GuardMode.off
    max_saturated: float = 1e-3  # fraction of a tensor clipped to +-max
    max_underflow: float = 0.1  # fraction of nonzeros flushed to zero
    min_sqnr_db: float = 10.0  # signal-to-quantization-noise ratio of the cast, dB
    max_amax_jump: float = 16.0  # delayed roles: amax / amax at the previous check
    patience: int = 2  # checks in a row with a violation before a layer is promoted


@dataclass
class TrainerConfig:
    max_steps: int = 300
    global_batch_size: int = 16  # sequences per optimizer step, summed over all ranks
    micro_batch_size: int = 8  # sequences per rank per forward/backward
    seed: int = 1234
    eval_every: int = 100
    save_every: int = 100
    keep_last: int = 2  # checkpoints kept in <run_dir>/checkpoints
    resume: str = "auto"  # auto | none | <checkpoint dir or tag dir>
    fp8_telemetry_every: int = 50  # 0: never
    fp8_warm_start: bool = True  # fresh runs: first delayed scales from one measured pass, not 1
    default_recipe: str = "v3_fp8"  # used when no +recipe=NAME is given
    device: str = "auto"  # auto | cpu | cuda
    te_fallback: str = "error"  # recipe.backend=te and TE cannot express the recipe: error | native
    compile: bool = False  # torch.compile the model in place (FP8 linears trace whole, no graph break)
    compile_scope: str = "blocks"  # blocks: each decoder block (one graph reused, fast warm-up) | model
    compile_mode: str = "default"  # torch.compile mode: default | reduce-overhead (CUDA graphs) | max-autotune...
    kernels: bool = True  # fused Triton FP8 casts on CUDA (false: the torch reference, for A/B runs)
    compiled_casts: str = "auto"  # casts under torch.compile: auto | operators | inductor
    inductor_cast_roles: list[str] = field(default_factory=list)  # roles whose tensorwise casts Inductor
    # generates (fused into the op before them) whatever compiled_casts says: input | weight | grad_output
    precision_policy: str = "table"  # per-layer FP8/BF16 from measured crossovers: off | table | calibrate
    precision_min_speedup: float = 1.0  # a layer runs FP8 only where its measured speedup reaches this
    precision_calibration: str = "streamed"  # calibrate timing: streamed (launch time counts) | graphs (GPU only)
    dist_timeout_s: int = 1800
    on_divergence: OnDivergence = OnDivergence.skip  # stop | skip | rollback (see OnDivergence)
    max_bad_steps: int = 3  # consecutive non-finite steps before stop / rollback
    max_rollbacks: int = 3  # rollbacks per launch before the run stops (on_divergence=rollback)
    fp8_guard: FP8GuardConfig = field(default_factory=FP8GuardConfig)


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    recipe: Optional[Dict[str, Any]] = None  # filled by +recipe=NAME (recipes/NAME.yaml)
    qat: Optional[Dict[str, Any]] = None  # filled by +qat=NAME (conf/qat/NAME.yaml): fp8train.qat


def register_schema() -> None:
    """Store TrainConfig under SCHEMA_NAME; conf/config.yaml lists it first in its defaults."""
    ConfigStore.instance().store(name=SCHEMA_NAME, node=TrainConfig)


def register_recipes(recipes_dir: Path) -> list[str]:
    """Store every recipes/*.yaml as an option of the `recipe` group; return their names."""
    store = ConfigStore.instance()
    names = []
    for path in sorted(Path(recipes_dir).glob("*.yaml")):
        store.store(group="recipe", name=path.stem, node=OmegaConf.load(path))
        names.append(path.stem)
    return names
