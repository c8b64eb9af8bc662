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

The plain model's own persistent buffers (MoE expert_bias, which steers routing, and expert_load)
come from rank 0's module states; the FP8 layers' amax histories and scales are left out (the
loaded model has plain nn.Linear layers). Before any of it, every file in the checkpoint's
manifest (or, without one, every rank's optimizer shard) must be there: a lost shard is a
ValueError naming it. tests/train/test_trained_model_zero.py checks ZeRO-1/2/3 on 2 ranks.

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
from fp8train.train.integrity import MANIFEST_KEY, size_problems

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


def check_files(ref: CheckpointRef) -> None:
    """Every file the checkpoint was written with is there, at its size: a lost rank's shard is
    named here instead of failing deep inside DeepSpeed (or, for the BF16_Optimizer's flat
    partitions, reassembling weights from the ranks that are left)."""
    problems = size_problems(ref.path, ref.meta.get(MANIFEST_KEY))
    world_size = ref.meta.get("world_size")
    if not problems and isinstance(world_size, int):  # a checkpoint written without a manifest
        found = {int(_RANK.search(p.name).group(1)) for p in ref.path.glob("*optim_states.pt")}
        problems = [f"the optim_states file of rank {r} is missing" for r in range(world_size)
                    if found and r not in found]
    if problems:
        raise ValueError(f"checkpoint {ref.path} is incomplete: {'; '.join(problems)}. Copy the missing "
                         f"files back from where the run was written, or pass an older complete tag "
                         f"folder under {ref.load_dir}")


def master_weights(ref: CheckpointRef, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The FP32 master weights of `ref` by parameter name (see the module docstring)."""
    check_files(ref)
    tag_dir = ref.path
    optim_files = sorted(tag_dir.glob("*optim_states.pt"))
    shapes = {n: p.shape for n, p in model.named_parameters()}
    if optim_files:
        first = torch.load(optim_files[0], map_location="cpu", weights_only=False)["optimizer_state_dict"]
        if "zero_stage" in first:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            state = get_fp32_state_dict_from_zero_checkpoint(str(ref.load_dir), tag=ref.tag)
            # it also returns the module's buffers: the FP8 layers' amax histories and scales,
            # which the plain model has not (its own buffers come from buffers_of)
            return {name: tensor for name, tensor in state.items() if name in shapes}
        return _bf16_optimizer_weights(optim_files, shapes)
    state = torch.load(_model_file(tag_dir), map_location="cpu", weights_only=False)
    if (state.get("optimizer") or {}).get("fp32_groups"):
        return _zero0_weights(state, model)
    return {n: t.float() for n, t in state["module"].items() if n in shapes}


def _model_file(tag_dir: Path) -> Path:
    """Rank 0's module states: mp_rank_00_model_states.pt (ZeRO 0-2), zero_pp_rank_0_... (ZeRO-3)."""
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):
        if (tag_dir / name).is_file():
            return tag_dir / name
    raise ValueError(f"{tag_dir} holds no DeepSpeed model states (mp_rank_00_model_states.pt or "
                     f"zero_pp_rank_0_mp_rank_00_model_states.pt); pass a complete fp8train checkpoint")


def buffers_of(ref: CheckpointRef, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The plain model's own persistent buffers (MoE expert_bias, which steers routing, and
    expert_load) as trained, from rank 0's module states; {} for a model without any. The FP8
    layers' buffers in the same file are not wanted: the loaded model has plain nn.Linear layers."""
    parameters = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    names = [n for n in model.state_dict() if n not in parameters]
    if not names:
        return {}
    module = torch.load(_model_file(ref.path), map_location="cpu", weights_only=False)["module"]
    return {n: module[n] for n in names if n in module}


def load_trained_model(path: str | Path) -> TrainedModel:
    ref, run_dir = find_checkpoint_ref(path)
    config = model_config_of(ref)
    model = build_model(config)
    weights = {**master_weights(ref, model), **buffers_of(ref, model)}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not (config.tie_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"{ref.path} does not match the model it records: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    cfg = run_config(run_dir)
    return TrainedModel(model.eval(), config, dataset_of(cfg), run_dir, ref,
                        ref.meta["fingerprint"].get("recipe", "?"), cfg)


def describe(trained: TrainedModel) -> dict:
    return {"run_dir": str(trained.run_dir), "checkpoint": str(trained.checkpoint.path), "recipe": trained.recipe,
            "model_config": dataclasses.asdict(trained.model_config), "dataset_dir": str(trained.dataset_dir)}
