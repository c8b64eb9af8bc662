"""The error one FP8 recipe injects into one training step, paired and without training noise.

    python -m fp8train.sweep.recipe_error runs/<bf16 run> --recipes v3_fp8,hybrid,current \\
        --variant 'v3_blockwise=v3_fp8:input.scaling=blockwise,weight.scaling=blockwise,grad_output.scaling=blockwise,padding=zero'

Final losses of short runs differ by seed and by GPU nondeterminism more than the recipes differ
(docs/QUALITY.md), so this measures the cause instead: on a TRAINED model (a run's final weights,
run_model.load_run_model) and the same validation micro-batches, each recipe's forward + backward
is compared with the high-precision one (FP32 GEMMs):

    loss gap %      100 * (loss_fp8 - loss_hp) / loss_hp       what FP8 costs the forward pass
    grad SQNR dB    20 log10(||g_hp|| / ||g_fp8 - g_hp||)       how exact the update direction is
                    (over all parameters' gradients concatenated)

Delayed-scaling recipes first run `--warmup` micro-batches (forward + backward + the scale update,
no weight change) so their amax histories hold real values, as they would mid-training.
A variant is `LABEL=PRESET:key=value,key=value` with keys of the recipe (role.field or field).
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
from pathlib import Path

import torch
import yaml

from fp8train import data as fp8data
from fp8train import numerics
from fp8train.sweep.run_model import dataset_dir, load_run_model


def variant_recipe(text: str) -> tuple[str, numerics.Recipe]:
    """'LABEL=PRESET:key=value,...' or 'PRESET' -> (label, Recipe)."""
    head, _, sets = text.partition(":")
    label, _, preset = head.rpartition("=")
    raw = numerics.load_recipe(preset).to_dict()
    for item in filter(None, sets.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"variant {text!r}: {item!r} is not key=value (e.g. input.scaling=current)")
        node, *rest = key.split(".")
        target = raw[node] if rest else raw
        target[rest[0] if rest else node] = yaml.safe_load(value)
    label = label or preset
    raw["name"] = label
    return label, numerics.recipe_from_dict(raw)


def _batches(cfg: dict, count: int, skip: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    val = fp8data.ValBatches(fp8data.TokenFile(dataset_dir(cfg), "val"), cfg["data"]["seq_len"],
                             cfg["trainer"]["micro_batch_size"], max_batches=count + skip)
    return list(val)[skip:]


def _loss_and_grad(model: torch.nn.Module, batch) -> tuple[float, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss = model(*batch)
    loss.backward()
    grads = [p.grad.flatten() for p in model.parameters() if p.grad is not None]
    return float(loss.detach()), torch.cat(grads).double()


def measure(base: torch.nn.Module, cfg: dict, recipes: dict[str, numerics.Recipe], batches: int,
            warmup: int) -> dict[str, dict[str, float]]:
    """Per recipe: mean loss gap (%) and gradient SQNR (dB) over `batches` micro-batches."""
    evals, warm = _batches(cfg, batches, skip=warmup), _batches(cfg, warmup)
    reference = [_loss_and_grad(base, b) for b in evals]
    out = {}
    for label, recipe in recipes.items():
        model = copy.deepcopy(base)
        numerics.convert_to_fp8(model, recipe, backend="auto", te_fallback="native")
        for batch in warm:  # fills delayed-scaling histories; weights do not change
            _loss_and_grad(model, batch)
            numerics.after_optimizer_step(model)
        gaps, sqnrs = [], []
        for batch, (loss_hp, grad_hp) in zip(evals, reference):
            loss, grad = _loss_and_grad(model, batch)
            numerics.after_optimizer_step(model)
            gaps.append(100.0 * (loss - loss_hp) / loss_hp)
            sqnrs.append(20 * math.log10(float(grad_hp.norm() / (grad - grad_hp).norm())))
        out[label] = {"loss_gap_pct": sum(gaps) / len(gaps), "loss_gap_sd": _sd(gaps),
                      "grad_sqnr_db": sum(sqnrs) / len(sqnrs)}
    return out


def _sd(values: list[float]) -> float:
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / max(1, len(values) - 1))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fp8train.sweep.recipe_error", description=__doc__.split("\n")[0])
    p.add_argument("run", type=Path, help="a finished run whose final weights are the model to probe")
    p.add_argument("--recipes", default="v3_fp8,hybrid,current,blockwise", help="comma-separated presets")
    p.add_argument("--variant", action="append", default=[], help="LABEL=PRESET:key=value,... (repeatable)")
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--warmup", type=int, default=4)
    args = p.parse_args(argv)
    try:
        recipes = dict(variant_recipe(name) for name in args.recipes.split(",") if name)
        recipes.update(variant_recipe(text) for text in args.variant)
        base, cfg = load_run_model(args.run)
        base.train()
        results = measure(base, cfg, recipes, args.batches, args.warmup)
    except (ValueError, KeyError) as error:
        print(f"recipe_error: error: {error}", file=sys.stderr)
        return 2
    print(f"| recipe | loss gap vs FP32 (%) mean +- sd over {args.batches} batches | grad SQNR (dB) |")
    print("|---|---|---|")
    for label, r in results.items():
        print(f"| {label} | {r['loss_gap_pct']:+.3f} +- {r['loss_gap_sd']:.3f} | {r['grad_sqnr_db']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
