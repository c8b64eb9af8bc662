"""A finished run's model back in memory, and its validation loss, outside the trainer.

    model, cfg = load_run_model(Path("runs/<id>"))          # FP32, high precision, eval mode
    loss = validation_loss(model, cfg, max_batches=64)      # mean token cross-entropy (nats)

The run's resolved Hydra config (.hydra/<launch>/config.yaml) says which model size, overrides,
sequence length and dataset it used; the newest complete checkpoint (checkpoints/latest) holds the
module weights (DeepSpeed's mp_rank_00_model_states.pt, BF16 under the bf16 engine). The model is
rebuilt WITHOUT the FP8 swap by default, so FP8 scaling buffers in the checkpoint are ignored;
every parameter must be found, or ValueError names the missing ones. Used to measure exports (RTN,
QAT) of trained runs: the serving model computes in high precision from (fake-)quantized weights.
With `fp8=True` the run's recipe is applied (and the FP8 health guard's promotions replayed) and
the checkpoint's FP8 state (amax histories, scales) is loaded too: the model as it trained.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml

from fp8train import data as fp8data
from fp8train import models, numerics
from fp8train.numerics.health_guard import replay_promotions
from fp8train.sweep.runs import _latest_hydra_dir
from fp8train.train.fp8_guard import GUARD_FILE
from fp8train.train.precision import recorded_layers


def run_config(run_dir: Path) -> dict:
    hydra = _latest_hydra_dir(run_dir)
    if hydra is None:
        raise ValueError(f"{run_dir} has no .hydra record; pass a run folder written by launch/train.py")
    return yaml.safe_load((hydra / "config.yaml").read_text())


def dataset_dir(cfg: dict) -> Path:
    data = cfg["data"]
    if data["path"] == "default":
        return fp8data.ensure_default_corpus(data.get("cache_dir"), data["default_corpus_bytes"])
    return Path(data["path"]).expanduser()


def _checkpoint_file(run_dir: Path) -> Path:
    latest = run_dir / "checkpoints" / "latest"
    if not latest.is_file():
        raise ValueError(f"{run_dir} has no complete checkpoint (no checkpoints/latest)")
    path = latest.parent / latest.read_text().strip() / "mp_rank_00_model_states.pt"
    if not path.is_file():
        raise ValueError(f"{path} is missing (ZeRO-3 checkpoints keep weights partitioned: not supported here)")
    return path


def _to_fp8(model: torch.nn.Module, cfg: dict, checkpoint: Path) -> None:
    if cfg.get("recipe"):  # the layers the run trained in FP8 (its precision policy), where recorded
        numerics.convert_to_fp8(model, numerics.recipe_from_dict(dict(cfg["recipe"])), backend="auto",
                                te_fallback="native", module_filter=recorded_layers(checkpoint.parent))
    guard = checkpoint.parent / GUARD_FILE
    if guard.is_file():
        replay_promotions(model, json.loads(guard.read_text()).get("promotions", []))


def load_run_model(run_dir: Path, device: str | torch.device = "cpu", fp8: bool = False
                   ) -> tuple[torch.nn.Module, dict]:
    """(FP32 model with the run's final weights, in eval mode; the run's resolved config)."""
    cfg = run_config(run_dir)
    vocab = fp8data.TokenFile(dataset_dir(cfg), "train").vocab_size
    model_cfg = cfg["model"]
    config = models.model_config(model_cfg["size"], vocab, model_cfg.get("max_seq_len") or cfg["data"]["seq_len"],
                                 **dict(model_cfg.get("overrides") or {}))
    model = models.build_model(config)
    checkpoint = _checkpoint_file(run_dir)
    if fp8:
        _to_fp8(model, cfg, checkpoint)
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)["module"]
    missing, _unexpected = model.load_state_dict({k: v.float() for k, v in state.items()}, strict=fp8)
    own = {name for name, _ in model.named_parameters()}
    if own & set(missing):
        raise ValueError(f"checkpoint of {run_dir} lacks parameters {sorted(own & set(missing))[:5]}")
    return model.to(device).eval(), cfg


@torch.no_grad()
def validation_loss(model: torch.nn.Module, cfg: dict, max_batches: int | None = None,
                    batch_size: int | None = None) -> float:
    """Token-weighted mean cross-entropy over the run's validation windows (the trainer's metric)."""
    device = next(model.parameters()).device
    batches = fp8data.ValBatches(fp8data.TokenFile(dataset_dir(cfg), "val"), cfg["data"]["seq_len"],
                                 batch_size or cfg["data"]["val_batch_size"], max_batches=max_batches)
    total, count = 0.0, 0
    for input_ids, labels in batches:
        tokens = int((labels != -100).sum())
        total += float(model(input_ids.to(device), labels.to(device))) * tokens
        count += tokens
    return total / count
