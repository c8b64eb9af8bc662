"""The training run: build, train, close.

    spec = resolve(cfg, run_dir)      # every user error surfaces here (config.py)
    trainer = Trainer(spec)           # process group, logger, data, FP32 model -> FP8 -> DeepSpeed
    trainer.train()                   # optimizer steps, eval, checkpoints, preemption
    trainer.close()

One optimizer step = grad_accum_steps micro-batches. For each: loss = engine(input_ids, labels);
engine.backward(loss); engine.step() (DeepSpeed steps the optimizer and the LR schedule only at
the accumulation boundary). After the boundary the FP8 state is advanced once
(`numerics.after_optimizer_step`: amax all-reduce, delayed-scale update, weight-cache
invalidation), and so is MoE bias balancing when the model has it. A model without FP8 state
(recipe bf16, or every layer kept in BF16 by the precision policy) skips every FP8 hook and the
telemetry steps: its step is the BF16 step (benchmarks/host_overhead.py counts it).

Reliability, each in its own module:
    step_guard.py   a non-finite step is never applied (weights, moments, FP8 scales), and is
                    reported: the step, the FP8 buffers and gradients that went non-finite
    divergence.py   trainer.on_divergence: stop | skip | rollback after max_bad_steps in a row
    checkpoint.py   atomic commits with sha256 manifests; damaged checkpoints are named, and
                    resume=auto falls back past them; non-finite weights are never saved
    branching.py    resuming from an older checkpoint sets the newer ones aside
    data_watch.py   a dataset file that changes under the run stops it
Errors found while training raise TrainingError (errors.py): exit code 3, one clear line.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from fp8train import data as fp8data
from fp8train import models, numerics, qat
from fp8train.quant.casts import configure_casts
from fp8train.train import branching, checkpoint, distributed
from fp8train.train.checkpoint import Checkpointer, CheckpointRef, tag_for
from fp8train.train.compiling import (compiled_cast_route, compile_mode_kwargs, compile_model, compile_scope,
                                      grads_out_of_graph_memory, mark_graph_step, replays_cuda_graphs)
from fp8train.train.config import RunSpec, StartupError, resolve
from fp8train.train.data_watch import DataWatch
from fp8train.train.divergence import DivergenceError, DivergencePolicy, Verdict
from fp8train.train.engine import build_engine, quiet_prints
from fp8train.train.errors import named_failures
from fp8train.train.evaluate import evaluate
from fp8train.train.fp8_guard import FP8GuardHook
from fp8train.train.logger import make_logger
from fp8train.train.precision import build_policy, no_fp8_warning, save_fp8_layers
from fp8train.train.signals import PreemptionFlag
from fp8train.train.step_guard import StepGuard, nonfinite_state, sync_lr_schedule
from fp8train.train.summary import gpu_peak_flops, mfu, peak_memory_gib, setup_lines
from fp8train.train.throughput import Throughput, phase


class Trainer:
    """Owns the engine and the loop; every rank builds one (the logger is null off rank 0)."""

    def __init__(self, spec: RunSpec):
        self.spec, cfg = spec, spec.cfg
        with quiet_prints(cfg.logger.verbose):
            self.dist = distributed.init_distributed(spec.device, cfg.trainer.dist_timeout_s)
        self.logger = make_logger(self.dist.is_main, spec.run_dir, cfg.logger, spec.resolved)
        self.train_batches, self.val_batches = self._build_data()
        self.fp8_guard = FP8GuardHook(cfg.trainer.fp8_guard, spec.recipe, self.logger, self.dist.device)
        self.model = self._build_model()
        self.fp8_state = numerics.has_fp8_state(self.model)  # False: the BF16 step, no FP8 hooks
        self.guard = StepGuard(self.model, spec.device, fp16=spec.ds_config.get("fp16") is not None)
        self.engine = build_engine(self.model, cfg.optim, spec.ds_config,
                                   cfg.optim.decay_steps or cfg.trainer.max_steps, spec.device,
                                   self.guard.optimizer_pre_hook, cfg.logger.verbose)
        self.checkpointer = Checkpointer(spec.run_dir, cfg.trainer.keep_last, spec.fingerprint,
                                         self.dist.rank, self.dist.world_size, spec.device)
        self.policy = DivergencePolicy(cfg.trainer.on_divergence, cfg.trainer.max_bad_steps,
                                       cfg.trainer.max_rollbacks)
        self.step, self.events = 0, []
        if spec.resume_from is not None:
            self._resume(spec.resume_from)
        if self.fp8_state:  # the delayed state's final addresses, before a CUDA graph records them
            numerics.delayed_bank(self.model)
        self.data_watch = DataWatch([self.train_batches.token_file.path, self.val_batches.token_file.path,
                                     self.train_batches.token_file.meta_path], spec.device)
        self.preemption = PreemptionFlag(spec.device)
        self.last_val: dict[str, float] = {}
        self.report = None  # the StepReport of the last step when it was not applied
        self.last_train_loss: float | None = None  # None until a step is logged (NaN: a real non-finite loss)
        self.throughput = Throughput()  # steady-state and wall-clock tokens/s (throughput.py)

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
        trainer_cfg = spec.cfg.trainer
        configure_casts(trainer_cfg.kernels, compiled_cast_route(trainer_cfg.compiled_casts, trainer_cfg.compile_mode),
                        tuple(trainer_cfg.inductor_cast_roles))
        policy = build_policy(spec, model, self.logger.info)  # FP8 where it pays (precision.py)
        report = numerics.convert_to_fp8(model, spec.recipe, module_filter=policy,
                                         te_fallback=spec.cfg.trainer.te_fallback)
        self.conversion_report = report  # for benchmarks/bench_e2e.py: which layers run FP8 and why
        qat_report = qat.apply_qat(model, spec.qat) if spec.qat is not None else None
        self.fp8_guard.restore(model, spec.resume_from)  # promoted layers exist before weights load
        self.before_forward = lambda: None
        if trainer_cfg.compile:  # in place, per block by default (compiling.py)
            if replays_cuda_graphs(trainer_cfg.compile_mode):
                self.before_forward = mark_graph_step
                grads_out_of_graph_memory(model)
            self.logger.info(compile_model(model, compile_scope(trainer_cfg.compile_scope),
                                           **compile_mode_kwargs(trainer_cfg.compile_mode)))
        for line in setup_lines(spec, model, report, self.train_batches, self.dist.world_size):
            self.logger.info(line)
        warning = no_fp8_warning(spec, policy, report)
        if warning is not None:
            self.logger.warning(warning)
        if qat_report is not None:
            self.logger.info(f"{spec.qat.describe()}; {qat_report}")
        for note in spec.notes:
            self.logger.warning(note)
        return model

    def _resume(self, ref: CheckpointRef) -> None:
        try:  # sha256 of every file; resume=auto falls back past a damaged checkpoint
            ref = self.checkpointer.verified(ref, fallback=self.spec.cfg.trainer.resume == "auto")
        except ValueError as error:
            raise StartupError(f"trainer.resume={self.spec.cfg.trainer.resume}: {error}") from error
        for damaged in ref.skipped:
            self.logger.warning(f"{damaged}; resuming from the newest complete checkpoint {ref.path} instead")
        client_state = self.checkpointer.load(self.engine, ref)
        try:
            self.train_batches.load_state_dict(client_state["data"])
        except ValueError as error:
            raise StartupError(f"trainer.resume: {ref.path}: {error}") from error
        self.step = int(client_state["step"])
        sync_lr_schedule(self.engine.lr_scheduler, self.step)  # the schedule follows the step
        if ref.meta.get("world_size") != self.dist.world_size:
            self.logger.warning(f"checkpoint written by {ref.meta.get('world_size')} ranks, now "
                                f"{self.dist.world_size}: per-rank RNG states were not restored")
        self.logger.info(f"resumed from {ref.path} at step {self.step}")
        self._start_branch(ref, "resume=auto fell back past a damaged checkpoint" if ref.skipped
                           else "resumed from an older checkpoint than the newest")

    def _start_branch(self, ref: CheckpointRef, reason: str, **event) -> None:
        """Collective: set aside checkpoints newer than `ref` (branching.py); queue the event
        record (`event`, e.g. a rollback's, is merged into the branch's)."""
        record = branching.start_branch(self.checkpointer.dir, ref, reason) if self.dist.is_main else None
        distributed.barrier()
        if record or event:
            self.events.append({**(record or {}), **event, "reason": reason})

    # ----------------------------------------------------------------------------- train
    def train(self) -> dict:
        """Run until trainer.max_steps or a stop signal; returns the summary."""
        trainer = self.spec.cfg.trainer
        self.logger.start(trainer.max_steps, self.step)
        self._flush_events()
        if self.step == 0 and self.fp8_state and trainer.fp8_warm_start:
            self._warm_start_fp8()
        stopping = False
        while self.step < trainer.max_steps and not stopping:
            self.data_watch.check(f"before step {self.step + 1}")
            metrics = self._timed_step()
            stopping = self.preemption.should_stop()
            done = self.step == trainer.max_steps
            # a scheduled eval runs when preempted too: the resumed run starts after this step,
            # and the metric history must match an uninterrupted run's
            if done or self.step % trainer.eval_every == 0:
                self.last_val = evaluate(self.engine, self.val_batches, self.dist.device, self.before_forward)
                metrics.update(self.last_val)
            self._log(metrics, force=done or stopping or self.report is not None)
            rolled_back = self._handle_divergence()
            if done or stopping or rolled_back or (self.step % trainer.save_every == 0
                                                    and self.policy.healthy):
                self.save()  # after a rollback: makes the skipped data permanent
        if stopping:
            self.logger.mark_preempted(self.step, self.preemption.received)
        if not self.last_val and not stopping:  # resumed at max_steps: nothing trained
            self.last_val = evaluate(self.engine, self.val_batches, self.dist.device, self.before_forward)
        return self._summarize(preempted=stopping)

    def _warm_start_fp8(self) -> None:
        """A fresh run's first delayed scales from one pass over the first validation sequences,
        instead of 1 (numerics/warm_start.py)."""
        blocks = getattr(self.model, "layers", None)
        first_block = blocks[0] if blocks is not None and len(blocks) else None
        if first_block is None:
            self.logger.warning("trainer.fp8_warm_start: the model has no `layers`; the delayed "
                                "scales start at 1")
            return
        cfg, device = self.spec.cfg, self.dist.device
        # the same batch on every rank (rank 0 of 1): the scales do not depend on the world size
        first = fp8data.ValBatches(self.val_batches.token_file, cfg.data.seq_len, cfg.trainer.micro_batch_size,
                                   0, 1, 1)
        input_ids, labels = next(iter(first))

        # the module itself, not the engine: DeepSpeed hooks the engine's outputs' backward
        warmed = numerics.warm_start_delayed_scales(
            self.model, lambda: self.model(input_ids.to(device), labels.to(device)), first_block)
        if warmed:
            self.logger.info(f"FP8 warm start: {warmed} delayed scales set from one pass over the first "
                             f"validation sequences (trainer.fp8_warm_start=false starts them at 1)")

    def _handle_divergence(self) -> bool:
        """Apply trainer.on_divergence (divergence.py) to this step; True after a rollback."""
        verdict = self.policy.judge(self.report)
        if self.report is not None:
            self.logger.warning(self.policy.describe(self.report))
        target = self.policy.rollback_target(self.checkpointer) if verdict is Verdict.ROLLBACK else None
        if target is not None:
            self._rollback(target)
        elif verdict is not Verdict.CONTINUE:
            self._summarize(preempted=False, diverged=True)
            raise DivergenceError(self.policy.stop_message(self.report, self.checkpointer.dir))
        return target is not None

    def _rollback(self, ref: CheckpointRef) -> None:
        """Reload `ref`, keep the data position (skipping the batches since `ref`), continue."""
        event = self.policy.rolled_back(ref, self.step)
        self.fp8_guard.restore(self.model, ref)  # promotions made after `ref` are undone first
        self.checkpointer.load(self.engine, ref)  # weights, moments, FP8 state, LR, RNG
        self.fp8_state = numerics.has_fp8_state(self.model)  # the checkpoint's structure
        if self.fp8_state:
            numerics.invalidate_weight_caches(self.model)
        sync_lr_schedule(self.engine.lr_scheduler, self.step)
        self._start_branch(ref, **event)
        self._flush_events()

    def _flush_events(self) -> None:
        for record in self.events:
            self.logger.event(record)
        self.events.clear()

    def _timed_step(self) -> dict:
        telemetry = self._telemetry_due()
        # a telemetry step runs eagerly under torch.compile: no second graph is ever compiled
        with self.throughput.step(self.train_batches.tokens_per_step, telemetry) as timing, \
                numerics.fp8_telemetry_step(self.model, telemetry):
            metrics = self._optimizer_step()
        metrics["train/tokens_per_s"] = timing.tokens_per_s
        return metrics

    def _telemetry_due(self) -> bool:
        every = self.spec.cfg.trainer.fp8_telemetry_every
        return self.spec.recipe.enabled and self.fp8_state and every > 0 and (self.step + 1) % every == 0

    def _optimizer_step(self) -> dict:
        """grad_accum_steps micro-batches, one optimizer step, one FP8 state update.

        A model without FP8 state (`self.fp8_state` False: recipe bf16, or every layer kept in BF16
        by the precision policy) runs exactly the BF16 step: no FP8 hook is called."""
        engine, device = self.engine, self.dist.device
        telemetry = self._telemetry_due()
        if telemetry:  # off otherwise: cleared after every telemetry step
            numerics.set_fp8_telemetry(self.model, True)
        lr = engine.get_lr()[0]
        losses = []
        self.guard.begin_step()
        for micro_step in range(self.spec.grad_accum_steps):
            input_ids, labels = next(self.train_batches)
            self.before_forward()
            with phase("forward"):
                loss = engine(input_ids.to(device), labels.to(device))
            with phase("backward"):
                engine.backward(loss)
            losses.append(loss.detach().to(torch.float32, copy=True))  # a graph output: the next replay reuses it
            last = micro_step == self.spec.grad_accum_steps - 1
            assert engine.is_gradient_accumulation_boundary() == last, "accumulation out of sync"
            if last:
                with phase("step guard"):
                    self.guard.before_boundary(losses)  # all ranks agree on vetoing a non-finite loss
            with phase("optimizer"):
                engine.step()
        self.step += 1
        with phase("step guard"):
            grad_norm = engine.get_global_grad_norm()
            self.report = self.guard.after_step(self.step, losses, grad_norm)
        if self.report is None:
            if self.fp8_state:
                with phase("fp8 update"):
                    numerics.after_optimizer_step(self.model)
            getattr(self.model, "update_moe_bias", lambda: None)()
        else:  # not applied: FP8 state restored by the guard; the LR schedule still moves on
            if self.fp8_state:
                numerics.invalidate_weight_caches(self.model)  # re-cast: record the weight amax again
            sync_lr_schedule(engine.lr_scheduler, self.step)
        metrics = {"train/loss": torch.stack(losses).mean(), "train/lr": lr,
                   "train/grad_norm": float(grad_norm) if grad_norm is not None else None}
        if self.report is not None:
            metrics["train/skipped"] = 1
        if telemetry:
            metrics.update(numerics.fp8_telemetry(self.model))
            metrics.update(self.fp8_guard.check(self.step, self.model, metrics))
            numerics.set_fp8_telemetry(self.model, False)
            self.fp8_state = numerics.has_fp8_state(self.model)  # a promotion may have swapped layers
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

    def save(self) -> Path | None:
        """Collective. Never writes non-finite weights, nor a state trained on changed data."""
        self.data_watch.check(f"before writing the checkpoint of step {self.step}")
        nonfinite = nonfinite_state(self.model, self.dist.device)
        if nonfinite:
            self.logger.warning(f"checkpoint of step {self.step} NOT written: non-finite values in "
                                f"{', '.join(nonfinite[:4])}; the newest checkpoint stays "
                                f"{checkpoint.latest_tag(self.checkpointer.dir)}")
            return None
        self.fp8_guard.save(self.checkpointer.dir / tag_for(self.step), self.dist.is_main)  # before the commit
        save_fp8_layers(self.checkpointer.dir / tag_for(self.step), self.conversion_report.converted,
                        self.dist.is_main)
        path = self.checkpointer.save(self.engine, self.step,
                                      {"data": self.train_batches.state_dict()})
        self.logger.info(f"checkpoint {path}")
        return path

    # ----------------------------------------------------------------------------- close
    def _summarize(self, preempted: bool, diverged: bool = False) -> dict:
        spec, dev = self.spec, self.dist.device
        throughput = self.throughput.summary()  # steady state (MFU uses it) and wall clock
        tokens_per_s = throughput["tokens_per_s"] or 0.0
        gpu_name, peak = gpu_peak_flops(dev)
        memory, memory_source = peak_memory_gib(dev)
        (memory,) = distributed.all_reduce([memory], "max", dev)  # the largest rank
        flops = self.model.flops_per_token(spec.cfg.data.seq_len)
        summary = {
            "recipe": spec.recipe.name, "qat": spec.qat.name if spec.qat else None,
            "model_size": spec.cfg.model.size,
            "parameters": self.model.num_parameters(), "world_size": self.dist.world_size,
            "device": gpu_name, "steps": self.step, "preempted": preempted, "diverged": diverged,
            "skipped_steps": self.policy.skipped, "rollbacks": self.policy.rollbacks,
            "tokens_seen": self.step * self.train_batches.tokens_per_step,
            **throughput,
            "mfu": mfu(flops, tokens_per_s, self.dist.world_size, peak),
            "final_train_loss": self.last_train_loss,
            "final_val_loss": self.last_val.get("val/loss"),  # None: preempted before any eval
            "final_val_ppl": self.last_val.get("val/ppl"),
            "unigram_entropy": fp8data.unigram_entropy(self.train_batches.token_file),
            "peak_memory_gib": memory, "peak_memory_source": memory_source,
            "fp8_layers": len(self.conversion_report.converted),  # 0: every GEMM ran in high precision
            "fp8_guard": self.fp8_guard.summary(),
            "run_dir": str(spec.run_dir),
        }
        self.logger.summary(summary)
        return summary

    def close(self, process_ending: bool = False) -> None:
        """process_ending (run(): the launch script's job, the process exits next): keep the
        stop-signal handlers until it does, so that a SIGTERM during teardown cannot turn a
        finished run into exit -15 (signals.py); otherwise put the previous handlers back."""
        self.throughput.watch.close()
        if process_ending:
            late = self.preemption.stand_down()
            if late:
                self.logger.warning(late)
        else:
            self.preemption.restore()
        self.logger.close()


def run(cfg) -> dict:
    """Hydra's job function: resolve, build, train, close. Returns the summary."""
    from hydra.core.hydra_config import HydraConfig

    spec = resolve(cfg, Path(HydraConfig.get().runtime.output_dir))
    trainer = Trainer(spec)
    try:
        with named_failures(spec.run_dir, lambda: trainer.step):
            return trainer.train()
    finally:
        trainer.close(process_ending=True)
