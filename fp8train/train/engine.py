"""The DeepSpeed engine: precision plumbing, optimizer, LR schedule, ZeRO.

Who owns what. The model arrives in FP32 with its linear layers already swapped for FP8 ones
(when the recipe enables FP8); the FP8 casts happen inside those layers' forward and backward,
so DeepSpeed never sees an FP8 parameter. DeepSpeed then owns everything about precision
outside the GEMMs:

    parameters / activations   bf16 (or fp16, or fp32), cast by the engine at initialize()
    master weights             FP32, in the ZeRO / BF16 optimizer's partitions
    gradient accumulation      FP32 via data_types.grad_accum_dtype (ZeRO >= 1 only: DeepSpeed
                               raises for stage 0 + bf16 + fp32 accumulation)
    loss scaling               fp16 only, dynamic
    clipping                   gradient_clipping (global norm, on the FP32 gradients)

FP32 scaling buffers (amax histories, scales) stay FP32: deepspeed >= 0.19.2 casts parameters
only, not buffers. The client optimizer (torch AdamW, fused on CUDA) and the warmup + cosine
LambdaLR are handed to `deepspeed.initialize`, so the engine steps and checkpoints both.

DeepSpeed prints memory reports while it builds its optimizer (`MA 0.47 GB Max_MA ...`,
`CPU Virtual Memory: ...`); `quiet_prints` keeps them off the console unless logger.verbose=true
(they still go to the rank's log file at DEBUG level).
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
from typing import Any, Callable, Iterator

import torch
from torch import nn

from fp8train.train.schema import DeepSpeedConfig, OptimConfig, Precision

NEVER_PRINT = 1 << 30  # DeepSpeed's steps_per_print: we log ourselves


def deepspeed_config(ds: DeepSpeedConfig, micro_batch_size: int, grad_accum_steps: int, world_size: int = 1
                     ) -> tuple[dict[str, Any], list[str]]:
    """The DeepSpeed config dict, plus notes worth logging about what it implies."""
    notes = []
    if ds.zero_stage == 3 and world_size == 1:
        notes.append("deepspeed.zero_stage=3 on one rank partitions nothing but still hooks every module: "
                     "on one H200 a 1B step took 737 ms at ZeRO-3 vs 514 ms at ZeRO-1 (BF16), and FP8 lost "
                     "its gain (0.87x BF16; benchmarks/results/h200x2_session6); use deepspeed.zero_stage=1 "
                     "on one GPU")
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum_steps,
        "gradient_clipping": ds.gradient_clipping,
        "zero_optimization": {"stage": ds.zero_stage, **ds.zero_options},
        "steps_per_print": NEVER_PRINT,
        "wall_clock_breakdown": False,
    }
    if ds.precision == Precision.bf16:
        config["bf16"] = {"enabled": True}
    elif ds.precision == Precision.fp16:
        config["fp16"] = {"enabled": True, "loss_scale": 0,  # 0 = dynamic
                          "initial_scale_power": ds.initial_scale_power,
                          "loss_scale_window": ds.loss_scale_window,
                          "hysteresis": ds.hysteresis, "min_loss_scale": ds.min_loss_scale}
    if ds.precision != Precision.fp32 and ds.fp32_grad_accum:
        if ds.zero_stage >= 1:
            config["data_types"] = {"grad_accum_dtype": "fp32"}
        else:
            notes.append(f"ZeRO stage 0 accumulates gradients in {ds.precision.value}: DeepSpeed "
                         f"supports FP32 accumulation only with deepspeed.zero_stage >= 1")
    return config, notes


def check_deepspeed_config(ds: DeepSpeedConfig, device: torch.device) -> None:
    """Reject combinations DeepSpeed would fail on later, naming the setting to change."""
    if ds.zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"deepspeed.zero_stage={ds.zero_stage} is not allowed; "
                         f"choose 0, 1, 2 or 3")
    if ds.precision == Precision.fp16 and device.type != "cuda":
        raise ValueError("deepspeed.precision=fp16 needs a CUDA GPU (DeepSpeed's CPU accelerator "
                         "has no fp16 support); use deepspeed.precision=bf16 or fp32")
    check_zero_options(ds.zero_stage, dict(ds.zero_options))
    if ds.gradient_clipping < 0:
        raise ValueError(f"deepspeed.gradient_clipping={ds.gradient_clipping} must be >= 0 "
                         f"(0 disables clipping)")


def check_zero_options(zero_stage: int, options: dict[str, Any]) -> None:
    """`deepspeed.zero_options` validated by DeepSpeed's own schema (DeepSpeedZeroConfig) before any
    work, so a misspelt or mistyped key stops the launch with its name instead of deep inside
    deepspeed.initialize (or, for some keys, never)."""
    if not options:
        return
    if "stage" in options:
        raise ValueError("deepspeed.zero_options.stage: set the stage with deepspeed.zero_stage")
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    from pydantic import ValidationError

    try:
        DeepSpeedZeroConfig(stage=zero_stage, **options)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
        known = sorted(f.alias or name for name, f in DeepSpeedZeroConfig.model_fields.items() if name != "stage")
        raise ValueError(f"deepspeed.zero_options: {problems} (keys are DeepSpeed's zero_optimization names: "
                         f"{', '.join(known)})") from None


def check_resume_world_size(checkpoint_path, saved_world_size: int | None, zero_stage: int,
                            world_size: int) -> None:
    """A ZeRO checkpoint resumes only at the data-parallel world size that wrote it.

    ZeRO stages 1-3 save the optimizer state (and under ZeRO-3 the parameters) as one partition
    per rank; DeepSpeed refuses to load them at another world size, deep inside engine start-up
    with a raw traceback. Say so before any work, with the two ways forward. Stage 0 keeps whole
    states and resumes at any size; a checkpoint without a recorded size is left to DeepSpeed."""
    if zero_stage == 0 or saved_world_size is None or saved_world_size == world_size:
        return
    raise ValueError(f"checkpoint {checkpoint_path} holds ZeRO-{zero_stage} partitions written by "
                     f"{saved_world_size} ranks, but this launch has {world_size}; DeepSpeed resumes "
                     f"ZeRO >= 1 states only at the same world size. Relaunch with {saved_world_size} "
                     f"ranks (torchrun --nnodes x --nproc_per_node, or submit.py --nodes x "
                     f"--gpus-per-node), or start fresh in another run folder with trainer.resume=none")


def warmup_cosine(warmup_steps: int, decay_steps: int, min_lr_ratio: float):
    """LR multiplier for optimizer step s: linear warmup, then cosine down to min_lr_ratio."""

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, decay_steps - warmup_steps))
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return multiplier


def build_optimizer(model: nn.Module, optim: OptimConfig, device: torch.device
                    ) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (norm gains and other vectors are not decayed)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": optim.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    fused = device.type == "cuda" if optim.fused is None else optim.fused
    return torch.optim.AdamW(groups, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps,
                             fused=fused)


@contextlib.contextmanager
def quiet_prints(verbose: bool) -> Iterator[None]:
    """Capture what DeepSpeed `print`s (its logger is left alone) unless verbose."""
    if verbose:
        yield
        return
    captured = io.StringIO()
    try:
        with contextlib.redirect_stdout(captured):
            yield
    finally:
        if captured.getvalue().strip():
            logging.getLogger("fp8train").debug("deepspeed:\n%s", captured.getvalue().rstrip())


def build_engine(model: nn.Module, optim: OptimConfig, ds_config: dict, schedule_steps: int,
                 device: torch.device, step_pre_hook: Callable | None = None,
                 verbose: bool = False):
    """deepspeed.initialize with our client optimizer and scheduler; returns the engine.

    `step_pre_hook` is registered on the client optimizer (it runs inside DeepSpeed's step,
    right before the parameters are updated; step_guard.py uses it to veto a bad step)."""
    import deepspeed

    optimizer = build_optimizer(model, optim, device)
    if step_pre_hook is not None:
        optimizer.register_step_pre_hook(step_pre_hook)
    multiplier = warmup_cosine(optim.warmup_steps, schedule_steps, optim.min_lr_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
    with quiet_prints(verbose):
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                               lr_scheduler=scheduler, config=ds_config)
    return engine
