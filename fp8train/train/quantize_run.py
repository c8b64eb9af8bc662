"""The PTQ job behind launch/quantize.py: load -> calibrate -> quantize -> evaluate -> export -> report.

    trained = load_trained_model(checkpoint)          # FP32 master weights, never modifying the run
    baseline perplexity on the run's val split (non-overlapping windows)
    for the preset (+ every `compare` preset): copy the model, quantize block by block on
        calibration windows of the train split, evaluate (with `deadline_s`, compare presets not
        started by then are skipped and listed in the report)
    the preset's model -> <output>/ (safetensors + compressed-tensors config.json; export=false: none), with
        report.{json,md,png}, plan.yaml and, for budgeted plans, sensitivity.{json,md,png}

Every user error (missing checkpoint, unknown preset, group size that does not divide K, too little
calibration data, an existing output folder) is a ValueError raised before any output is written.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from pathlib import Path

import torch
import yaml

from fp8train import data as fp8data
from fp8train.ptq import (PtqConfig, QuantPlan, calibration_batches, eval_windows, evaluate_perplexity,
                          greedy_plan, quantize_decoder, save_quantized, uniform_plan)
from fp8train.ptq.export import require_export_packages
from fp8train.ptq.pipeline import planned_linears
from fp8train.ptq.plan import LayerPlan
from fp8train.ptq.report import write_perplexity_report, write_sensitivity_report
from fp8train.ptq.sensitivity import layer_sensitivity
from fp8train.quant.spec import QuantSpec
from fp8train.train.trained_model import TrainedModel, describe, load_trained_model

PRESETS_DIR = Path(__file__).resolve().parents[2] / "conf" / "quant"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def load_preset(name: str) -> PtqConfig:
    path = PRESETS_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"unknown quant preset {name!r}; available: {sorted(p.stem for p in PRESETS_DIR.glob('*.yaml'))}")
    return PtqConfig.from_dict(yaml.safe_load(path.read_text()))


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"device={name!r}; choose auto, cpu or cuda")
    return torch.device(name)


def _output_dir(cfg: dict, trained: TrainedModel, preset: str) -> Path:
    out = Path(cfg["output"] or f"quantized/{trained.run_dir.name}-{preset}")
    if out.resolve() == trained.run_dir.resolve() or trained.run_dir.resolve() in out.resolve().parents:
        raise ValueError(f"output={out} is inside the source run {trained.run_dir}; the run is never written to")
    if out.exists() and any(out.iterdir()) and not cfg["overwrite"]:
        raise ValueError(f"export path {out} already exists; choose another output= or pass overwrite=true")
    return out


def _plan(cfg: dict, config: PtqConfig, model, windows) -> tuple[QuantPlan, list[dict] | None]:
    """The preset's plan: a plan file, a greedy plan from a sensitivity analysis (on calibration
    data: `windows` come from the train split, never the val split it is evaluated on), or uniform."""
    if cfg.get("plan"):
        return QuantPlan.load(cfg["plan"]), None
    if cfg.get("plan_budget_bits") is None:
        return uniform_plan(config.weight, config.input), None
    high = LayerPlan(QuantSpec.from_dict(dict(cfg["plan_high"]), "plan_high"), config.input)
    rows = layer_sensitivity(model, windows,
                             {"low": config.weight, "high": high.weight}, progress=cfg["progress"])
    return greedy_plan(rows, LayerPlan(config.weight, config.input), high, float(cfg["plan_budget_bits"]),
                       fuse_groups=cfg.get("plan_fuse_groups", True)), rows


def _linear_sizes(model) -> dict[str, int]:
    return {f"layers.{i}.{n}": m.weight.numel() for i, b in enumerate(model.layers)
            for n, m in b.named_modules() if isinstance(m, torch.nn.Linear) and not n.endswith("router")}


def _source_recipe_row(trained: TrainedModel, windows, cfg: dict, dtype, device) -> dict:
    from fp8train import numerics

    model = copy.deepcopy(trained.model)
    numerics.convert_to_fp8(model, numerics.load_recipe(trained.recipe))
    model = model.to(device=device, dtype=dtype)
    return {"method": f"trained ({trained.recipe})", **evaluate_perplexity(model, windows, cfg["eval"]["batch_size"])}


def run_quantize(cfg: dict) -> Path:
    """cfg: the plain dict of conf/quantize.yaml plus `quant` (the preset). Returns the output folder."""
    started = time.perf_counter()
    if not cfg.get("quant"):
        raise ValueError(f"no preset: add +quant=NAME (available: {sorted(p.stem for p in PRESETS_DIR.glob('*.yaml'))})")
    config = PtqConfig.from_dict(dict(cfg["quant"]))
    compare = [load_preset(name) for name in cfg.get("compare") or []]
    deadline = cfg.get("deadline_s")
    if deadline is not None and (isinstance(deadline, bool) or not isinstance(deadline, (int, float)) or deadline < 0):
        raise ValueError(f"deadline_s={deadline!r}; give seconds >= 0 (or null: run every compare preset)")
    if not isinstance(cfg.get("plan_fuse_groups", True), bool):
        raise ValueError(f"plan_fuse_groups={cfg['plan_fuse_groups']!r}; give true (q/k/v and gate/up share one "
                         f"quantizer, as vLLM/SGLang need) or false (layer by layer, for serving with fp8train)")
    device, dtype = _device(cfg["device"]), _DTYPES.get(cfg["eval"]["dtype"])
    if dtype is None:
        raise ValueError(f"eval.dtype={cfg['eval']['dtype']!r}; choose one of {sorted(_DTYPES)}")
    if cfg.get("export", True):
        require_export_packages()
    trained = load_trained_model(cfg["checkpoint"])
    out = _output_dir(cfg, trained, config.name)
    calib = cfg["calibration"]
    dataset = trained.dataset_dir if calib["dataset"] == "run" else Path(calib["dataset"])
    batches = calibration_batches(fp8data.TokenFile(dataset, "train"), calib["samples"], calib["seq_len"],
                                  calib["batch_size"], calib["seed"], cfg["progress"])
    windows = eval_windows(fp8data.TokenFile(trained.dataset_dir, "val"), cfg["eval"]["seq_len"], cfg["eval"]["windows"])
    if windows.shape[1] - 1 > trained.model_config.max_seq_len:
        raise ValueError(f"eval.seq_len={cfg['eval']['seq_len']} exceeds the model's max_seq_len "
                         f"{trained.model_config.max_seq_len}")
    model = trained.model.to(device=device, dtype=dtype)
    for preset in compare:  # group sizes that do not divide K, before any work
        planned_linears(model, uniform_plan(preset.weight, preset.input))
    if cfg.get("plan_budget_bits") is None:
        planned_linears(model, uniform_plan(config.weight, config.input))
    sens_windows = eval_windows(fp8data.TokenFile(dataset, "train"), calib["seq_len"], cfg["sensitivity_windows"])
    plan, sensitivity = _plan(cfg, config, model, sens_windows.to(device))
    planned_linears(model, plan)
    rows = [{"method": "baseline", "avg_bits": 8 * dtype.itemsize, **evaluate_perplexity(model, windows, cfg["eval"]["batch_size"])}]
    if cfg["eval"].get("source_recipe"):
        rows.append({"avg_bits": 8, **_source_recipe_row(trained, windows, cfg, dtype, device)})
    deadline_at = None if deadline is None else started + deadline
    exported, skipped = _quantize_presets(cfg, model, [config, *compare], plan, batches, windows, rows, deadline_at)
    metadata = {"model_config": dataclasses.asdict(trained.model_config), "preset": config.to_dict(),
                "source": describe(trained)}
    if cfg.get("export", True):
        save_quantized(exported, out, metadata, overwrite=cfg["overwrite"])
    else:
        out.mkdir(parents=True, exist_ok=True)  # the report and plan only
    if sensitivity is not None:
        write_sensitivity_report(out, sensitivity, ["low", "high"])
    plan.save(out / "plan.yaml")
    notes = [f"Not run (deadline_s={deadline} passed): {', '.join(skipped)}"] if skipped else []
    return write_perplexity_report(out, rows, f"PTQ of {trained.run_dir.name} ({config.name})",
                                   {"eval_windows": int(windows.shape[0]), "eval_seq_len": cfg["eval"]["seq_len"],
                                    "calibration": f"{calib['samples']} x {calib['seq_len']} from {dataset}",
                                    "skipped": skipped}, notes=notes)


def _quantize_presets(cfg: dict, model, presets: list[PtqConfig], plan: QuantPlan, batches, windows,
                      rows: list[dict], deadline_at: float | None) -> tuple[torch.nn.Module, list[str]]:
    """Quantize a copy of `model` with each preset (the first with `plan`, the others uniformly)
    and append its evaluation to `rows`, printing one line per preset as it finishes (a job killed
    from outside still leaves its numbers in the console). Once time.perf_counter() passes
    `deadline_at`, no further compare preset is started; the first one always runs (it is the
    model exported). Returns (the first quantized model, names of the skipped presets)."""
    plan_sizes, base_ppl, exported, skipped = _linear_sizes(model), rows[0]["ppl"], None, []
    for index, preset in enumerate(presets):
        if index and deadline_at is not None and time.perf_counter() > deadline_at:
            skipped.append(preset.name)
            continue
        t0 = time.perf_counter()
        preset_plan = plan if index == 0 else uniform_plan(preset.weight, preset.input)
        quantized = copy.deepcopy(model)
        quantize_decoder(quantized, preset, preset_plan, batches, progress=cfg["progress"])
        result = evaluate_perplexity(quantized, windows, cfg["eval"]["batch_size"])
        label = preset.name if index or not (cfg.get("plan") or cfg.get("plan_budget_bits") is not None) \
            else f"{preset.name} + plan"
        rows.append({"method": label, "avg_bits": preset_plan.average_bits(plan_sizes), **result,
                     "seconds": time.perf_counter() - t0})
        print(f"{label}: ppl {result['ppl']:.4f} ({100 * (result['ppl'] / base_ppl - 1):+.3f}% vs baseline) "
              f"in {rows[-1]['seconds']:.1f} s", flush=True)
        exported = exported or quantized
    return exported, skipped


def build_from_config(model_config: dict) -> torch.nn.Module:
    """The float model a quantized folder's metadata describes (load_quantized's build_model)."""
    from fp8train.models import MoEConfig, ModelConfig, build_model

    fields = dict(model_config)
    if fields.get("moe") is not None:
        fields["moe"] = MoEConfig(**fields["moe"])
    return build_model(ModelConfig(**fields)).eval()


def run_evaluate(cfg: dict) -> Path:
    """One table: the trained model (if `checkpoint`) and every folder in `quantized`, same windows."""
    from fp8train.ptq import load_quantized
    from fp8train.ptq.export import read_config

    folders = [Path(f) for f in cfg.get("quantized") or []]
    if not cfg.get("checkpoint") and not folders:
        raise ValueError("nothing to evaluate: give checkpoint=runs/<id> and/or quantized=[folder,...]")
    device, dtype = _device(cfg["device"]), _DTYPES[cfg["eval"]["dtype"]]
    rows, dataset = [], None
    if cfg.get("checkpoint"):
        trained = load_trained_model(cfg["checkpoint"])
        dataset = trained.dataset_dir
    metas = [read_config(folder)["fp8train"] for folder in folders]
    dataset = Path(cfg.get("dataset") or dataset or metas[0]["source"]["dataset_dir"])
    windows = eval_windows(fp8data.TokenFile(dataset, "val"), cfg["eval"]["seq_len"], cfg["eval"]["windows"])
    if cfg.get("checkpoint"):
        model = trained.model.to(device=device, dtype=dtype)
        rows.append({"method": "baseline", **evaluate_perplexity(model, windows, cfg["eval"]["batch_size"])})
    for folder, meta in zip(folders, metas):
        model = load_quantized(folder, build_from_config).to(device=device, dtype=dtype)
        rows.append({"method": folder.name, **evaluate_perplexity(model, windows, cfg["eval"]["batch_size"])})
    if rows[0]["method"] != "baseline":
        rows.insert(0, {**rows[0], "method": "baseline"})  # no float model given: relative to the first folder
    out = Path(cfg["output"] or "quantized/evaluation")
    return write_perplexity_report(out, rows, "Perplexity on the validation split",
                                   {"eval_windows": int(windows.shape[0]), "dataset": str(dataset)}, stem="evaluation")
