"""The resolve step: validated Hydra values -> the runtime objects one run needs.

Hydra has already checked every key and type against fp8train/train/schema.py. `resolve` checks
what spans several fields or touches the outside world, and builds:

    recipe          fp8train.numerics.Recipe (from +recipe=NAME, or trainer.default_recipe)
    dataset_dir     the prepared dataset (the embedded corpus is prepared on first use)
    model_config    fp8train.models.ModelConfig (vocab_size from the dataset's meta.json)
    ds_config       the DeepSpeed config dict, with notes on what it implies
    resume_from     the checkpoint to continue from, already checked against the model shape
    qat             fp8train.qat.QATPreset from +qat=NAME (conf/qat/NAME.yaml), or None

Every user mistake raises `StartupError` with a message naming the setting and the fix; it is
raised before the process group, the model or any output file exists, so nothing is lost.
"""

from __future__ import annotations

import dataclasses
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
import torch
from omegaconf import DictConfig, OmegaConf

from fp8train import data as fp8data
from fp8train import models
from fp8train.numerics import Recipe, choose_backend, list_recipes, load_recipe, recipe_from_dict
from fp8train.numerics.backend_policy import TE_FALLBACKS
from fp8train.numerics.health_guard import GuardThresholds
from fp8train.qat import QATPreset, apply_qat, preset_from_dict
from fp8train.quant.casts import CAST_ROLES, COMPILED_ROUTES
from fp8train.train import checkpoint, distributed, engine
from fp8train.train.compiling import compile_mode_kwargs, compile_scope
from fp8train.train.precision import check_policy
from fp8train.train.schema import GuardMode, TrainConfig


class StartupError(Exception):
    """Bad input found before training: the message says what is wrong and how to fix it."""


@dataclass(frozen=True)
class RunSpec:
    cfg: TrainConfig
    run_dir: Path
    device: torch.device
    world_size: int
    recipe: Recipe
    recipe_source: str
    dataset_dir: Path
    grad_accum_steps: int
    model_config: models.ModelConfig
    ds_config: dict
    notes: tuple[str, ...]
    resume_from: checkpoint.CheckpointRef | None
    resolved: dict  # the whole config as plain data (for wandb and the log)
    qat: QATPreset | None = None  # fake-quantized training for a serving format (+qat=NAME)

    @property
    def fingerprint(self) -> dict:
        """What a checkpoint must match to be resumed by this run (JSON-normalised)."""
        model = dataclasses.asdict(self.model_config)
        return json.loads(json.dumps({"model": model, "recipe": self.recipe.name}))


def _recipe(cfg: TrainConfig) -> tuple[Recipe, str]:
    if cfg.recipe is not None:
        return recipe_from_dict(dict(cfg.recipe)), f"+recipe={cfg.recipe.get('name')}"
    name = cfg.trainer.default_recipe
    if name not in list_recipes():
        raise ValueError(f"trainer.default_recipe={name!r} is not a preset; available: "
                         f"{list_recipes()}")
    return load_recipe(name), f"trainer.default_recipe={name} (no +recipe=NAME given)"


def _dataset_dir(cfg: TrainConfig) -> Path:
    """The dataset folder; opening both splits surfaces the data package's errors now."""
    if cfg.data.path == "default":
        directory = fp8data.ensure_default_corpus(cfg.data.cache_dir, cfg.data.default_corpus_bytes)
    else:
        directory = Path(cfg.data.path).expanduser()
    for split in ("train", "val"):
        fp8data.TokenFile(directory, split, verify=cfg.data.verify_sha256)
    return directory


def _check_batches_fit(cfg: TrainConfig, directory: Path, accum: int, world_size: int) -> None:
    """data.seq_len (and the val batch) must fit each split: building the samplers checks it."""
    fp8data.TrainBatches(fp8data.TokenFile(directory, "train"), cfg.data.seq_len,
                         cfg.trainer.micro_batch_size, accum, 0, world_size, cfg.trainer.seed)
    fp8data.ValBatches(fp8data.TokenFile(directory, "val"), cfg.data.seq_len,
                       cfg.data.val_batch_size, 0, world_size, cfg.data.val_batches)


def _grad_accum_steps(cfg: TrainConfig, world_size: int) -> int:
    """Micro-steps per optimizer step, so that the global batch is the same for any world size."""
    micro, wanted = cfg.trainer.micro_batch_size, cfg.trainer.global_batch_size
    per_step = micro * world_size
    if micro < 1 or wanted < per_step or wanted % per_step:
        raise ValueError(f"trainer.global_batch_size={wanted} must be a positive multiple of "
                         f"trainer.micro_batch_size ({micro}) x world size ({world_size}) "
                         f"= {per_step}")
    return wanted // per_step


def _check_trainer(cfg: TrainConfig) -> None:
    trainer = cfg.trainer
    for name in ("max_steps", "eval_every", "save_every", "keep_last", "dist_timeout_s"):
        if getattr(trainer, name) < 1:
            raise ValueError(f"trainer.{name}={getattr(trainer, name)} must be >= 1")
    if trainer.compiled_casts not in COMPILED_ROUTES:
        raise ValueError(f"trainer.compiled_casts={trainer.compiled_casts!r}; choose one of {list(COMPILED_ROUTES)}")
    unknown = [r for r in trainer.inductor_cast_roles if r not in CAST_ROLES]
    if unknown:
        raise ValueError(f"trainer.inductor_cast_roles has unknown role(s) {unknown}; choose from {list(CAST_ROLES)}, "
                         f"e.g. trainer.inductor_cast_roles=[grad_output]")
    if trainer.max_bad_steps < 1 or trainer.max_rollbacks < 0:
        raise ValueError(f"trainer.max_bad_steps={trainer.max_bad_steps} must be >= 1 and "
                         f"trainer.max_rollbacks={trainer.max_rollbacks} >= 0")
    if trainer.fp8_telemetry_every < 0:
        raise ValueError(f"trainer.fp8_telemetry_every={trainer.fp8_telemetry_every} must be >= 0")
    _check_guard(cfg)
    if cfg.optim.warmup_steps < 0 or not 0 <= cfg.optim.min_lr_ratio <= 1:
        raise ValueError(f"optim.warmup_steps={cfg.optim.warmup_steps} must be >= 0 and "
                         f"optim.min_lr_ratio={cfg.optim.min_lr_ratio} in [0, 1]")
    if cfg.logger.log_every < 1:
        raise ValueError(f"logger.log_every={cfg.logger.log_every} must be >= 1")


def _check_guard(cfg: TrainConfig) -> None:
    guard = cfg.trainer.fp8_guard
    if guard.mode == GuardMode.off:
        return
    if cfg.trainer.fp8_telemetry_every < 1:
        raise ValueError(f"trainer.fp8_guard.mode={guard.mode.value} checks the FP8 telemetry, but "
                         f"trainer.fp8_telemetry_every=0 collects none; set it to N >= 1 (checks every N steps)")
    if guard.mode == GuardMode.act and cfg.deepspeed.zero_stage == 3:
        raise ValueError("trainer.fp8_guard.mode=act swaps layers during training, which ZeRO-3's partitioned "
                         "parameters do not allow; use deepspeed.zero_stage<=2 or trainer.fp8_guard.mode=warn")
    GuardThresholds(guard.max_saturated, guard.max_underflow, guard.min_sqnr_db, guard.max_amax_jump,
                    guard.patience)  # raises ValueError naming a bad threshold


def _model_config(cfg: TrainConfig, vocab_size: int):
    max_seq_len = cfg.model.max_seq_len or cfg.data.seq_len
    if max_seq_len < cfg.data.seq_len:
        raise ValueError(f"model.max_seq_len={max_seq_len} is below data.seq_len="
                         f"{cfg.data.seq_len}; raise it or set it to null")
    overrides = dict(cfg.model.overrides)
    return models.model_config(cfg.model.size, vocab_size, max_seq_len, **overrides)


def _check_te(recipe: Recipe, te_fallback: str) -> None:
    """The backend the module swap will pick must be available (e.g. backend=te: TE importable on an
    FP8 GPU, recipe expressible) before any work: the same policy, asked early."""
    if recipe.enabled:
        choose_backend(recipe, te_fallback=te_fallback)
    elif te_fallback not in TE_FALLBACKS:
        raise ValueError(f"trainer.te_fallback={te_fallback!r}; choose one of {list(TE_FALLBACKS)}")


def _check_qat_shapes(model_config, qat: QATPreset) -> None:
    """Every layer QAT targets must split into the preset's groups: tried on a meta-device model."""
    with torch.device("meta"):
        model = models.build_model(model_config)
    apply_qat(model, qat)


@contextmanager
def _about(setting: str = ""):
    """Turn a ValueError/FileNotFoundError into a StartupError, prefixed with the setting when
    the message (from the data, model or checkpoint code) does not name it already."""
    try:
        yield
    except (ValueError, FileNotFoundError) as error:
        raise StartupError(f"{setting}: {error}" if setting else str(error)) from error


def resolve(raw: DictConfig, run_dir: Path) -> RunSpec:
    """Validated Hydra config -> RunSpec, or StartupError (see the module docstring)."""
    cfg: TrainConfig = OmegaConf.to_object(raw)
    distributed.ensure_launcher_env()
    world_size = int(os.environ["WORLD_SIZE"])
    with _about():
        device = distributed.pick_device(cfg.trainer.device)
        _check_trainer(cfg)
        check_policy(cfg.trainer, device)
        compile_scope(cfg.trainer.compile_scope)
        compile_mode_kwargs(cfg.trainer.compile_mode)
        engine.check_deepspeed_config(cfg.deepspeed, device)
        accum = _grad_accum_steps(cfg, world_size)
    with _about("recipe"):
        recipe, recipe_source = _recipe(cfg)
        _check_te(recipe, cfg.trainer.te_fallback)
    with _about("qat"):
        qat = None if cfg.qat is None else preset_from_dict(dict(cfg.qat))
    with _about(f"data.path={cfg.data.path}"):
        dataset_dir = _dataset_dir(cfg)
    with _about(f"data.seq_len={cfg.data.seq_len}"):
        _check_batches_fit(cfg, dataset_dir, accum, world_size)
    with _about("model"):
        model_config = _model_config(cfg, fp8data.TokenFile(dataset_dir, "train").vocab_size)
    if qat is not None:
        with _about(f"+qat={qat.name}"):
            _check_qat_shapes(model_config, qat)
    ds_config, notes = engine.deepspeed_config(cfg.deepspeed, cfg.trainer.micro_batch_size, accum, world_size)
    resolved = OmegaConf.to_container(raw, resolve=True, enum_to_str=True)
    spec = RunSpec(cfg, run_dir, device, world_size, recipe, recipe_source, dataset_dir, accum,
                   model_config, ds_config, tuple(notes), None, resolved, qat)
    with _about(f"trainer.resume={cfg.trainer.resume}"):
        resume_from = checkpoint.find_checkpoint(cfg.trainer.resume, run_dir)
        if resume_from is not None:
            checkpoint.check_fingerprint(resume_from, spec.fingerprint)
            engine.check_resume_world_size(resume_from.path, resume_from.meta.get("world_size"),
                                           cfg.deepspeed.zero_stage, world_size)
    return dataclasses.replace(spec, resume_from=resume_from)
