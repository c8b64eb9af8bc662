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

Both are means over micro-batches with a 95% Student-t interval; `vs <first recipe>` is the
PAIRED difference of loss gaps to the first FP8 recipe listed (same batches), so two recipes can be
told apart far below the batch-to-batch spread.

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
from fp8train.sweep import gap_stats
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


def measure(base: torch.nn.Module, recipes: dict[str, numerics.Recipe], evals: list, warm: list
            ) -> dict[str, dict[str, list[float]]]:
    """Per recipe and eval micro-batch (input_ids, labels): loss gap (%) and gradient SQNR (dB);
    `warm` batches run first (delayed scaling histories). `base` itself is left unchanged."""
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
            noise = float((grad - grad_hp).norm())
            sqnrs.append(20 * math.log10(float(grad_hp.norm()) / noise) if noise > 0 else math.inf)
        out[label] = {"loss_gap_pct": gaps, "grad_sqnr_db": sqnrs}
    return out


def _mean_ci(values: list[float], spec: str = "+.3f") -> str:
    spread = gap_stats.spread(values)
    if spread.sd is None:
        return format(spread.mean, spec)
    half = gap_stats.t_quantile(0.95, spread.n) * spread.sd / math.sqrt(spread.n)
    return f"{spread.mean:{spec}} +- {half:{spec.lstrip('+')}}"


def table(results: dict[str, dict[str, list[float]]]) -> str:
    """Markdown: loss gap and grad SQNR with 95% intervals, and the paired difference to the
    first FP8 recipe of the table."""
    fp8 = [label for label, r in results.items() if any(g != 0 for g in r["loss_gap_pct"])]
    ref = fp8[0] if fp8 else None
    lines = [f"| recipe | loss gap vs FP32 (%) | grad SQNR (dB) | loss gap - {ref}'s (pp, paired) |",
             "|---|---|---|---|"]
    for label, r in results.items():
        diff = [a - b for a, b in zip(r["loss_gap_pct"], results[ref]["loss_gap_pct"])] if ref else []
        sqnr = r["grad_sqnr_db"]
        sqnr_text = "exact" if all(math.isinf(v) for v in sqnr) else _mean_ci(sqnr, ".1f")
        lines.append(f"| {label} | {_mean_ci(r['loss_gap_pct'])} | {sqnr_text} | "
                     f"{'(reference)' if label == ref else _mean_ci(diff) if diff else 'n/a'} |")
    return "\n".join(lines) + "\n"


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
        results = measure(base, recipes, _batches(cfg, args.batches, skip=args.warmup), _batches(cfg, args.warmup))
    except (ValueError, KeyError) as error:
        print(f"recipe_error: error: {error}", file=sys.stderr)
        return 2
    print(f"{args.run}: {args.batches} validation micro-batches, {args.warmup} warm-up; mean +- 95% t-interval")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
