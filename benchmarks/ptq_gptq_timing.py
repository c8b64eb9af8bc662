"""How long GPTQ takes on the 1B model's shapes: time a few blocks, extrapolate to the whole model.

    python benchmarks/ptq_gptq_timing.py                        # 1b: 3 of 16 blocks, 128 x 2048 calibration
    python benchmarks/ptq_gptq_timing.py --dry-run              # tiny shapes on the CPU (checks the logic)

A randomly initialised model of the size (fp8train.models; every block has the same shapes, so the
per-block time of a few blocks extrapolates to all of them), calibration windows from the default
corpus (prepared from this Python's standard library on first use, offline), GPTQ INT4 g128
asymmetric, block by block as the pipeline runs it: Hessians from one BF16 pass, the column solve
in FP32 (TF32 off), the quantized block re-run for the next block's inputs. The baseline is one
plain BF16 forward of a block over the same calibration tokens. Prints a table; --out writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fp8train.data import TokenFile, ensure_default_corpus  # noqa: E402
from fp8train.models import MODEL_SIZES, build_model, model_config  # noqa: E402
from fp8train.ptq import PtqConfig, calibration_batches, quantize_decoder, uniform_plan  # noqa: E402
from fp8train.ptq.decoder import run_block  # noqa: E402

PRESET = {"name": "gptq_w4_g128", "method": "gptq",
          "weight": {"format": "uint4", "granularity": "tile", "group_size": 128, "symmetric": False}}


def bf16_block_forward_seconds(model, batches, device) -> float:
    block = model.layers[0]
    xs = [model.embed(b.to(device)) for b in batches]
    cos, sin = model.rope(xs[0].shape[1])
    times = []
    for _ in range(3):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        with torch.no_grad():
            for x in xs:
                run_block(block, x, cos, sin)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="1b")
    parser.add_argument("--blocks", type=int, default=3)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.dry_run:
        args.size, args.blocks, args.samples, args.seq_len = "small", 2, 4, 64
    device = torch.device("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu")
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    tokens = TokenFile(ensure_default_corpus(), "train")
    config = model_config(args.size, tokens.vocab_size, args.seq_len, n_layers=args.blocks)
    torch.manual_seed(0)
    model = build_model(config).to(device=device, dtype=torch.bfloat16).eval()
    batches = calibration_batches(tokens, args.samples, args.seq_len, args.batch_size, seed=0)
    baseline = bf16_block_forward_seconds(model, batches, device)
    preset = PtqConfig.from_dict(PRESET)
    report = quantize_decoder(model, preset, uniform_plan(preset.weight), batches)
    per_block = statistics.median(report.block_seconds)
    total_blocks = MODEL_SIZES[args.size]["n_layers"]
    result = {"device": gpu, "size": args.size, "blocks_timed": args.blocks, "calibration": f"{args.samples} x {args.seq_len}",
              "block_seconds": report.block_seconds, "median_block_s": per_block,
              "bf16_block_forward_s": baseline, "model_blocks": total_blocks,
              "extrapolated_model_s": per_block * total_blocks,
              "gptq_loss_first_block": {k: v["gptq_loss"] for k, v in report.layers.items() if k.startswith("layers.0.")}}
    print(f"GPTQ {PRESET['name']} on {args.size} shapes, {gpu}, calibration {result['calibration']}")
    print(f"| blocks timed | median s/block | BF16 block forward s | blocks in model | extrapolated model s |")
    print(f"|---|---|---|---|---|")
    print(f"| {args.blocks} | {per_block:.2f} | {baseline:.3f} | {total_blocks} | {per_block * total_blocks:.1f} |")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
