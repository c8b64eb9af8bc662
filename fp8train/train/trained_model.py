"""Load a trained fp8train run for post-training work: FP32 master weights, config, dataset.

    trained = load_trained_model("runs/<id>")      # or runs/<id>/checkpoints, or one tag folder
    trained.model          fp8train.models.Transformer (plain FP32 nn.Linear layers, eval mode)
    trained.model_config   the ModelConfig recorded in the checkpoint's fingerprint
    trained.dataset_dir    the run's prepared dataset (the embedded corpus is re-prepared if needed)
    trained.recipe         the FP8 recipe it was trained with (e.g. "blockwise")

The weights are the optimizer's FP32 master copy, reassembled from whatever DeepSpeed saved:

    ZeRO-2 / ZeRO-3 (optimizer files carry `zero_stage`)  deepspeed.utils.zero_to_fp32
    BF16_Optimizer (ZeRO-1 + bf16 + FP32 accumulation)    each rank's flat FP32 partition cut by
                                                          its `param_slice_mappings`, fragments
                                                          concatenated in rank order
    ZeRO-0 + bf16                                         the model file's `fp32_groups`, in the
                                                          order engine.build_optimizer groups them
    fp32 training                                         the module weights themselves

Nothing in the run folder is written or moved.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from fp8train import data as fp8data
from fp8train.models import ModelConfig, MoEConfig, build_model
from fp8train.train.checkpoint import CHECKPOINT_DIR, LATEST_FILE, META_FILE, CheckpointRef, read_checkpoint

_RANK = re.compile(r"zero_pp_rank_(\d+)_")


@dataclass(frozen=True)
class TrainedModel:
    model: torch.nn.Module
    model_config: ModelConfig
    dataset_dir: Path
    run_dir: Path
    checkpoint: CheckpointRef
    recipe: str
    run_config: dict


def find_checkpoint_ref(path: str | Path) -> tuple[CheckpointRef, Path]:
    """(checkpoint, run folder) for a run folder, its checkpoints folder, or one tag folder."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ValueError(f"checkpoint {path} does not exist; pass runs/<id>, runs/<id>/checkpoints or a tag folder")
    if (path / CHECKPOINT_DIR / LATEST_FILE).is_file():
        path = path / CHECKPOINT_DIR
    if (path / LATEST_FILE).is_file():
        return read_checkpoint(path, (path / LATEST_FILE).read_text().strip()), path.parent
    if (path / META_FILE).is_file():
        return read_checkpoint(path.parent, path.name), path.parent.parent
    raise ValueError(f"no fp8train checkpoint at {path}: expected a run folder with {CHECKPOINT_DIR}/{LATEST_FILE}, "
                     f"a checkpoints folder, or a tag folder with {META_FILE}")


def model_config_of(ref: CheckpointRef) -> ModelConfig:
    fingerprint = ref.meta.get("fingerprint", {}).get("model")
    if not isinstance(fingerprint, dict):
        raise ValueError(f"{ref.path}/{META_FILE} has no model fingerprint; it is not an fp8train checkpoint")
    fields = dict(fingerprint)
    if fields.get("moe") is not None:
        fields["moe"] = MoEConfig(**fields["moe"])
    return ModelConfig(**fields)


def run_config(run_dir: Path) -> dict:
    """The newest resolved Hydra config of the run (.hydra/<launch>/config.yaml)."""
    launches = sorted((run_dir / ".hydra").glob("*/config.yaml"))
    if not launches:
        raise ValueError(f"{run_dir} has no .hydra/*/config.yaml: cannot tell which dataset the run used")
    return yaml.safe_load(launches[-1].read_text())


def dataset_of(config: dict) -> Path:
    data = config["data"]
    if data["path"] == "default":
        return Path(fp8data.ensure_default_corpus(data.get("cache_dir"), data["default_corpus_bytes"]))
    return Path(data["path"]).expanduser()


def _bf16_optimizer_weights(files: list[Path], shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    pieces: dict[str, list[torch.Tensor]] = {}
    for path in sorted(files, key=lambda p: int(_RANK.search(p.name).group(1))):
        state = torch.load(path, map_location="cpu", weights_only=False)["optimizer_state_dict"]
        for flat, mapping in zip(state["single_partition_of_fp32_groups"], state["param_slice_mappings"]):
            for name, fragment in mapping.items():
                pieces.setdefault(name, []).append(flat[fragment.start:fragment.start + fragment.numel])
    return {name: torch.cat(parts).reshape(shapes[name]).clone() for name, parts in pieces.items()}


def _zero0_weights(model_state: dict, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    order = [n for n, p in params if p.dim() >= 2] + [n for n, p in params if p.dim() < 2]  # build_optimizer
    flat = [t for group in model_state["optimizer"]["fp32_groups"] for t in group]
    return {name: tensor.float().clone() for name, tensor in zip(order, flat)}


def master_weights(ref: CheckpointRef, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The FP32 master weights of `ref` by parameter name (see the module docstring)."""
    tag_dir = ref.path
    optim_files = sorted(tag_dir.glob("*optim_states.pt"))
    shapes = {n: p.shape for n, p in model.named_parameters()}
    if optim_files:
        first = torch.load(optim_files[0], map_location="cpu", weights_only=False)["optimizer_state_dict"]
        if "zero_stage" in first:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            return dict(get_fp32_state_dict_from_zero_checkpoint(str(ref.load_dir), tag=ref.tag))
        return _bf16_optimizer_weights(optim_files, shapes)
    model_file = tag_dir / "mp_rank_00_model_states.pt"
    if not model_file.is_file():
        raise ValueError(f"{tag_dir} holds no DeepSpeed model or optimizer states")
    state = torch.load(model_file, map_location="cpu", weights_only=False)
    if (state.get("optimizer") or {}).get("fp32_groups"):
        return _zero0_weights(state, model)
    return {n: t.float() for n, t in state["module"].items() if n in shapes}


def load_trained_model(path: str | Path) -> TrainedModel:
    ref, run_dir = find_checkpoint_ref(path)
    config = model_config_of(ref)
    model = build_model(config)
    weights = master_weights(ref, model)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not (config.tie_embeddings and k == "lm_head.weight")
               and not k.endswith(("_amax_history", "_scale", "bias_balance"))]
    if missing or unexpected:
        raise ValueError(f"{ref.path} does not match the model it records: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    cfg = run_config(run_dir)
    return TrainedModel(model.eval(), config, dataset_of(cfg), run_dir, ref,
                        ref.meta["fingerprint"].get("recipe", "?"), cfg)


def describe(trained: TrainedModel) -> dict:
    return {"run_dir": str(trained.run_dir), "checkpoint": str(trained.checkpoint.path), "recipe": trained.recipe,
            "model_config": dataclasses.asdict(trained.model_config), "dataset_dir": str(trained.dataset_dir)}
