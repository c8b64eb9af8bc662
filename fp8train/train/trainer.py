"""The training run: build, train, close.

    spec = resolve(cfg, run_dir)      # every user error surfaces here (config.py)
    trainer = Trainer(spec)           # process group, logger, data, FP32 model -> FP8 -> DeepSpeed
    trainer.train()                   # optimizer steps, eval, checkpoints, preemption
    trainer.close()

One optimizer step = grad_accum_steps micro-batches. For each: loss = engine(input_ids, labels);
engine.backward(loss); engine.step() (DeepSpeed steps the optimizer and the LR schedule only at
the accumulation boundary). After the boundary the FP8 state is advanced once
(`numerics.after_optimizer_step`: amax all-reduce, delayed-scale update, weight-cache
invalidation), and so is MoE bias balancing when the model has it.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import numpy as np
import torch

from fp8train import data as fp8data
from fp8train import models, numerics, qat
from fp8train.quant.casts import configure_casts
from fp8train.train import distributed
from fp8train.train.checkpoint import Checkpointer, CheckpointRef, tag_for
from fp8train.train.config import RunSpec, StartupError, resolve
from fp8train.train.engine import build_engine
from fp8train.train.evaluate import evaluate
from fp8train.train.fp8_guard import FP8GuardHook
from fp8train.train.logger import make_logger
from fp8train.train.signals import PreemptionFlag
from fp8train.train.summary import gpu_peak_flops, mfu, peak_memory_gib


class Trainer:
    """Owns the engine and the loop; every rank builds one (the logger is null off rank 0)."""

    def __init__(self, spec: RunSpec):
        self.spec, cfg = spec, spec.cfg
        self.dist = distributed.init_distributed(spec.device, cfg.trainer.dist_timeout_s)
        self.logger = make_logger(self.dist.is_main, spec.run_dir, cfg.logger, spec.resolved)
        self.train_batches, self.val_batches = self._build_data()
        self.guard = FP8GuardHook(cfg.trainer.fp8_guard, spec.recipe, self.logger, self.dist.device)
        self.model = self._build_model()
        self.engine = build_engine(self.model, cfg.optim, spec.ds_config,
                                   cfg.optim.decay_steps or cfg.trainer.max_steps, spec.device)
        self.checkpointer = Checkpointer(spec.run_dir, cfg.trainer.keep_last, spec.fingerprint,
                                         self.dist.rank, self.dist.world_size)
        self.step = 0
        if spec.resume_from is not None:
            self._resume(spec.resume_from)
        self.preemption = PreemptionFlag(spec.device)
        self.last_val: dict[str, float] = {}
        self.last_train_loss = float("nan")
        self.train_seconds, self.timed_tokens, self.session_steps = 0.0, 0, 0

    # ----------------------------------------------------------------------------- build
    def _build_data(self):
        spec, cfg = self.spec, self.spec.cfg
        train = fp8data.TrainBatches(fp8data.TokenFile(spec.dataset_dir, "train"), cfg.data.seq_len,
                                     cfg.trainer.micro_batch_size, spec.grad_accum_steps,
                                     self.dist.rank, self.dist.world_size, cfg.trainer.seed)
        val = fp8data.ValBatches(fp8data.TokenFile(spec.dataset_dir, "val"), cfg.data.seq_len,
                                 cfg.data.val_batch_size, self.dist.rank, self.dist.world_size,
                                 cfg.data.val_batches)
        return train, val

    def _build_model(self) -> torch.nn.Module:
        """FP32 model, identical on every rank (same seed), then the FP8 module swap."""
        spec, seed = self.spec, self.spec.cfg.trainer.seed
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        model = models.build_model(spec.model_config)
        configure_casts(spec.cfg.trainer.kernels, spec.cfg.trainer.compiled_casts)
        report = numerics.convert_to_fp8(model, spec.recipe, te_fallback=spec.cfg.trainer.te_fallback)
        qat_report = qat.apply_qat(model, spec.qat) if spec.qat is not None else None
        self.guard.restore(model, spec.resume_from)  # promoted layers exist before weights load
        if spec.cfg.trainer.compile:
            # in place: parameter names (checkpoints, DeepSpeed) stay those of the eager model
            model.compile()
        self._log_setup(model, report, qat_report)
        return model

    def _log_setup(self, model, report, qat_report) -> None:
        spec, log = self.spec, self.logger.info
        log(f"run dir {spec.run_dir}; world size {self.dist.world_size} on {spec.device}")
        log(f"recipe {spec.recipe.name!r} from {spec.recipe_source}: {spec.recipe.description}")
        log(str(report))
        if qat_report is not None:
            log(f"{self.spec.qat.describe()}; {qat_report}")
        log(f"GEMM backend: {numerics.describe_backend(model)}"
            + ("; torch.compile on" if spec.cfg.trainer.compile else ""))
        log(f"model {spec.cfg.model.size}: {model.num_parameters() / 1e6:.2f}M parameters, "
            f"{model.flops_per_token(spec.cfg.data.seq_len) / 1e6:.1f} MFLOP/token")
        log(f"data {spec.dataset_dir}: {self.train_batches.token_file.num_tokens} train tokens; "
            f"global batch {self.train_batches.global_batch_size} x {spec.cfg.data.seq_len} tokens "
            f"= {spec.cfg.trainer.micro_batch_size} micro x {spec.grad_accum_steps} accum x "
            f"{self.dist.world_size} ranks")
        log(f"deepspeed config {spec.ds_config}")
        for note in spec.notes:
            self.logger.warning(note)

    def _resume(self, ref: CheckpointRef) -> None:
        client_state = self.checkpointer.load(self.engine, ref)
        try:
            self.train_batches.load_state_dict(client_state["data"])
        except ValueError as error:
            raise StartupError(f"trainer.resume: {ref.path}: {error}") from error
        self.step = int(client_state["step"])
        if ref.meta.get("world_size") != self.dist.world_size:
            self.logger.warning(f"checkpoint written by {ref.meta.get('world_size')} ranks, now "
                                f"{self.dist.world_size}: per-rank RNG states were not restored")
        self.logger.info(f"resumed from {ref.path} at step {self.step}")

    # ----------------------------------------------------------------------------- train
    def train(self) -> dict:
        """Run until trainer.max_steps or a stop signal; returns the summary."""
        trainer = self.spec.cfg.trainer
        self.logger.start(trainer.max_steps, self.step)
        stopping = False
        while self.step < trainer.max_steps and not stopping:
            metrics = self._timed_step()
            stopping = self.preemption.should_stop()
            done = self.step == trainer.max_steps
            if (done or self.step % trainer.eval_every == 0) and not stopping:
                self.last_val = evaluate(self.engine, self.val_batches, self.dist.device)
                metrics.update(self.last_val)
            self._log(metrics, force=done or stopping)
            if done or stopping or self.step % trainer.save_every == 0:
                self.save()
        if stopping:
            self.logger.mark_preempted(self.step, self.preemption.received)
        if not self.last_val and not stopping:  # resumed at max_steps: nothing trained
            self.last_val = evaluate(self.engine, self.val_batches, self.dist.device)
        return self._summarize(preempted=stopping)

    def _timed_step(self) -> dict:
        started = time.perf_counter()
        metrics = self._optimizer_step()
        seconds = time.perf_counter() - started
        tokens = self.train_batches.tokens_per_step
        if self.session_steps > 0:  # this session's first step (warm-up) is not timed
            self.train_seconds += seconds
            self.timed_tokens += tokens
        self.session_steps += 1
        metrics["train/tokens_per_s"] = tokens / seconds
        return metrics

    def _optimizer_step(self) -> dict:
        """grad_accum_steps micro-batches, one optimizer step, one FP8 state update."""
        engine, device = self.engine, self.dist.device
        every = self.spec.cfg.trainer.fp8_telemetry_every
        telemetry = self.spec.recipe.enabled and every > 0 and (self.step + 1) % every == 0
        numerics.set_fp8_telemetry(self.model, telemetry)
        lr = engine.get_lr()[0]
        losses = []
        for micro_step in range(self.spec.grad_accum_steps):
            input_ids, labels = next(self.train_batches)
            loss = engine(input_ids.to(device), labels.to(device))
            engine.backward(loss)
            last = micro_step == self.spec.grad_accum_steps - 1
            assert engine.is_gradient_accumulation_boundary() == last, "accumulation out of sync"
            engine.step()
            losses.append(loss.detach().float())
        numerics.after_optimizer_step(self.model)
        getattr(self.model, "update_moe_bias", lambda: None)()
        self.step += 1
        grad_norm = engine.get_global_grad_norm()
        metrics = {"train/loss": torch.stack(losses).mean(), "train/lr": lr,
                   "train/grad_norm": float(grad_norm) if grad_norm is not None else None}
        if telemetry:
            metrics.update(numerics.fp8_telemetry(self.model))
            metrics.update(self.guard.check(self.step, self.model, metrics))
            numerics.set_fp8_telemetry(self.model, False)
        metrics.update(getattr(self.model, "last_metrics", {}))
        return metrics

    def _log(self, metrics: dict, force: bool) -> None:
        if self.step % self.spec.cfg.logger.log_every and not force:
            return
        (loss,) = distributed.all_reduce([float(metrics["train/loss"])], "sum", self.dist.device)
        metrics["train/loss"] = self.last_train_loss = loss / self.dist.world_size
        tokens = self.step * self.train_batches.tokens_per_step
        self.logger.log_metrics(self.step, {"tokens": tokens, **metrics})
        self.logger.progress(self.step, loss=metrics["train/loss"], lr=metrics["train/lr"],
                             tok_s=metrics["train/tokens_per_s"])

    def save(self) -> Path:
        self.guard.save(self.checkpointer.dir / tag_for(self.step), self.dist.is_main)  # before the commit
        path = self.checkpointer.save(self.engine, self.step,
                                      {"data": self.train_batches.state_dict()})
        self.logger.info(f"checkpoint {path}")
        return path

    # ----------------------------------------------------------------------------- close
    def _summarize(self, preempted: bool) -> dict:
        spec, dev = self.spec, self.dist.device
        tokens_per_s = self.timed_tokens / self.train_seconds if self.train_seconds else 0.0
        gpu_name, peak = gpu_peak_flops(dev)
        memory, memory_source = peak_memory_gib(dev)
        (memory,) = distributed.all_reduce([memory], "max", dev)  # the largest rank
        flops = self.model.flops_per_token(spec.cfg.data.seq_len)
        summary = {
            "recipe": spec.recipe.name, "qat": spec.qat.name if spec.qat else None,
            "model_size": spec.cfg.model.size,
            "parameters": self.model.num_parameters(), "world_size": self.dist.world_size,
            "device": gpu_name, "steps": self.step, "preempted": preempted,
            "tokens_seen": self.step * self.train_batches.tokens_per_step,
            "tokens_per_s": tokens_per_s,
            "mfu": mfu(flops, tokens_per_s, self.dist.world_size, peak),
            "final_train_loss": self.last_train_loss,
            "final_val_loss": self.last_val.get("val/loss"),  # None: preempted before any eval
            "final_val_ppl": self.last_val.get("val/ppl"),
            "unigram_entropy": fp8data.unigram_entropy(self.train_batches.token_file),
            "peak_memory_gib": memory, "peak_memory_source": memory_source,
            "fp8_guard": self.guard.summary(),
            "run_dir": str(spec.run_dir),
        }
        self.logger.summary(summary)
        return summary

    def close(self) -> None:
        self.preemption.restore()
        self.logger.close()


def run(cfg) -> dict:
    """Hydra's job function: resolve, build, train, close. Returns the summary."""
    from hydra.core.hydra_config import HydraConfig

    spec = resolve(cfg, Path(HydraConfig.get().runtime.output_dir))
    trainer = Trainer(spec)
    try:
        return trainer.train()
    finally:
        trainer.close()
