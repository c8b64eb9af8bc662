"""The start-up description and the end-of-run summary: what ran, how fast, how well, and at
what memory cost.

MFU (model FLOPs utilisation) = achieved training FLOP/s / peak FLOP/s of the GPUs, with the
model's training FLOPs per token (6 x active matmul parameters + attention, from
fp8train.models) times tokens/s. The denominator is the dense BF16 peak for every recipe, so
FP8 and BF16 runs are compared on one scale (an FP8 run can exceed what BF16 could reach).
Only GPUs with a known peak get an MFU; elsewhere it is reported as null.
"""

from __future__ import annotations

import resource

import torch

from fp8train.numerics import describe_backend

# Dense BF16 tensor-core peak in FLOP/s (SXM parts; no sparsity).
BF16_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def gpu_peak_flops(device: torch.device) -> tuple[str, float | None]:
    """(device name, dense BF16 peak FLOP/s or None when unknown or not a GPU)."""
    if device.type != "cuda":
        return "cpu", None
    name = torch.cuda.get_device_name(device)
    peak = next((flops for key, flops in BF16_PEAK_FLOPS.items() if key in name), None)
    return name, peak


def peak_memory_gib(device: torch.device) -> tuple[float, str]:
    """Peak memory of this process: CUDA max allocated on a GPU, max RSS on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30, "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "cpu_max_rss"  # KiB on Linux


def mfu(flops_per_token: float, tokens_per_s: float, world_size: int,
        peak_flops: float | None) -> float | None:
    if peak_flops is None or tokens_per_s <= 0:
        return None
    return flops_per_token * tokens_per_s / (peak_flops * world_size)


def setup_lines(spec, model, report, train_batches, world_size: int) -> list[str]:
    """What this run is, for the log: folder, recipe and conversion report, backend, model, data."""
    cfg = spec.cfg
    return [
        f"run dir {spec.run_dir}; world size {world_size} on {spec.device}",
        f"recipe {spec.recipe.name!r} from {spec.recipe_source}: {spec.recipe.description}",
        str(report),
        f"GEMM backend: {describe_backend(model)}" + ("; torch.compile on" if cfg.trainer.compile else ""),
        f"model {cfg.model.size}: {model.num_parameters() / 1e6:.2f}M parameters, "
        f"{model.flops_per_token(cfg.data.seq_len) / 1e6:.1f} MFLOP/token",
        f"data {spec.dataset_dir}: {train_batches.token_file.num_tokens} train tokens; global batch "
        f"{train_batches.global_batch_size} x {cfg.data.seq_len} tokens = {cfg.trainer.micro_batch_size} "
        f"micro x {spec.grad_accum_steps} accum x {world_size} ranks",
        f"deepspeed config {spec.ds_config}",
    ]
