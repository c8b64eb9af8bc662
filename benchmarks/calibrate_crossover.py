"""Measure the FP8-vs-BF16 crossover table of this GPU for the shipped model sizes.

    python benchmarks/calibrate_crossover.py --sizes 125m 350m 1b --recipes hybrid current blockwise \
        --cache "$FP8TRAIN_CACHE" --ship "$OUT/crossover.yaml" --match H100

For every size, the distinct (tokens, in, out) shapes of its converted linear layers (tokens per
GEMM = the experiment's micro-batch x sequence length, 16384 for conf/experiment/gpu_*), and every
recipe class, `fp8train.numerics.calibration` times BF16 vs FP8 forward+backward (--method streamed,
the default: launch time counts; graphs: CUDA graphs, GPU time only).
The rows go to the start-up calibration cache (what `trainer.precision_policy=calibrate` reads, so
the end-to-end benchmark after this measures nothing again) and, with --ship, to a table in the
format of recipes/crossover/*.yaml, ready to be committed as this GPU's shipped table. Prints a
table of speedups; never asserts on time.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import device_name, print_table, write_json  # noqa: E402
from fp8train import models  # noqa: E402
from fp8train.numerics import load_recipe  # noqa: E402
from fp8train.numerics.calibration import METHODS, STREAMED, calibrated_table, linear_shapes  # noqa: E402
from fp8train.numerics.crossover import CrossoverFile, recipe_class, save_crossover  # noqa: E402

TOKENS = {"125m": 16 * 1024, "350m": 16 * 1024, "1b": 8 * 2048}  # conf/experiment/gpu_<size>.yaml


def size_shapes(size: str, tokens: int):
    """The model's linear shapes, from a model built on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        model = models.build_model(models.model_config(size, 256, 2048))
    return linear_shapes(model, tokens)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["125m", "350m", "1b"])
    parser.add_argument("--recipes", nargs="+", default=["hybrid", "current", "blockwise"],
                        help="one recipe per class is enough (v3_fp8 is the delayed class, like hybrid)")
    parser.add_argument("--tokens", type=int, default=None, help="tokens per GEMM for every size")
    parser.add_argument("--cache", required=True, help="the data cache dir ($FP8TRAIN_CACHE)")
    parser.add_argument("--ship", help="also write a recipes/crossover/*.yaml table here")
    parser.add_argument("--match", default=None, help="the shipped table's device match (e.g. H100)")
    parser.add_argument("--out", help="JSON with every measurement")
    parser.add_argument("--method", default=STREAMED, choices=sorted(METHODS),
                        help="streamed: launch time counts (what an eager or per-block compiled step pays); "
                             "graphs: GPU time only")
    args = parser.parse_args(argv)
    name = device_name()
    shapes = sorted({s for size in args.sizes for s in size_shapes(size, args.tokens or TOKENS.get(size, 16384))})
    tables, rows = {}, {}
    for recipe_name in args.recipes:
        recipe = load_recipe(recipe_name)
        table = calibrated_table(shapes, recipe, Path(args.cache), name, log=lambda line: print(line, flush=True),
                                 method=args.method)
        tables[recipe_class(recipe)] = table
        for m in table.measurements:
            if m.shape in shapes:
                row = rows.setdefault(m.shape, {"shape": str(m.shape), "bf16_ms": f"{m.bf16_ms:.3f}"})
                row[recipe_class(recipe)] = f"{m.speedup:.2f}x"
    print(f"\ncrossover on {name} (FP8 speedup over BF16, fwd+bwd of one linear layer):")
    print_table([rows[s] for s in shapes], ["shape", "bf16_ms", *tables])
    if args.ship:
        shipped = CrossoverFile(name, args.match or name, str(torch.__version__), METHODS[args.method],
                                "scripts/gpu/dense.sh (benchmarks/calibrate_crossover.py)", tables)
        print(f"wrote {save_crossover(Path(args.ship), shipped)}")
    write_json(args.out, {"device": name, "torch": str(torch.__version__),
                          "tables": {k: [m.to_dict() for m in t.measurements] for k, t in tables.items()}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
