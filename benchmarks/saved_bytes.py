"""Bytes saved for backward by one decoder block: BF16 vs each FP8 recipe (runs on the CPU).

    python benchmarks/saved_bytes.py --size 1b --tokens 384 [--compiled] [--out f.json]

One decoder block of the named size, BF16 parameters and input (as DeepSpeed's BF16 engine runs
it), forward under torch.autograd.graph.saved_tensors_hooks; every saved tensor is counted once
per storage (q/k/v saving the same input share it) and put in a class:

    activations   token-proportional tensors (a dimension equals --tokens), by dtype
    fp8 weights   FP8 copies of weights held for backward (token-independent)
    params        the parameters themselves (BF16 keeps W for its backward: no extra memory)

`--compiled` compiles the block with the min-cut partitioner Inductor uses
(backend aot_eager_decomp_partition: the same saved-tensor choice, no code generation), which is
what a compiled training step keeps. The FP8 GEMMs run emulated on the CPU; what is saved does
not depend on the backend. Then the per-token figure is scaled to the gpu_<size> experiment
(16384 tokens per micro-batch, n_layers blocks) to show the activation memory at the peak.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import print_table, write_json  # noqa: E402
from fp8train import models  # noqa: E402
from fp8train.models.layers import RotaryEmbedding  # noqa: E402
from fp8train.models.llama import DecoderBlock  # noqa: E402
from fp8train.numerics import convert_to_fp8, load_recipe  # noqa: E402

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
EXPERIMENT_TOKENS = 16384


def saved_by_class(size: str, recipe: str, tokens: int, compiled: bool) -> dict[str, int]:
    """{class: bytes} saved for backward by one block's forward on `tokens` tokens."""
    torch.manual_seed(0)
    torch._dynamo.reset()
    config = models.model_config(size, 256, max(tokens, 128))
    block = DecoderBlock(config, 0).to(torch.bfloat16)
    if recipe != "bf16":
        convert_to_fp8(block, load_recipe(recipe), backend="emulated")
    params = {p.untyped_storage().data_ptr() for p in block.parameters()}
    storages: dict[int, tuple[int, str]] = {}

    @torch._dynamo.disable  # a hook called from compiled code must not be traced itself
    def pack(t: torch.Tensor):
        key = t.untyped_storage().data_ptr()
        if key in params:
            kind = "params"
        elif tokens in t.shape:
            kind = f"act {'fp8' if t.dtype in FP8_DTYPES else str(t.dtype).removeprefix('torch.')}"
        else:
            kind = "fp8 weights" if t.dtype in FP8_DTYPES else "other"
        storages[key] = (t.untyped_storage().nbytes(), kind)
        return t

    x = torch.randn(1, tokens, config.d_model, dtype=torch.bfloat16, requires_grad=True)
    cos, sin = RotaryEmbedding(config.head_dim, max(tokens, 128))(tokens)
    run = torch.compile(block, backend="aot_eager_decomp_partition") if compiled else block
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out, _ = run(x, cos, sin)
    totals: dict[str, int] = {}
    for nbytes, kind in storages.values():
        totals[kind] = totals.get(kind, 0) + nbytes
    del out
    return totals


def row(size: str, recipe: str, tokens: int, compiled: bool, bf16_act: float | None) -> dict:
    totals = saved_by_class(size, recipe, tokens, compiled)
    act = sum(v for k, v in totals.items() if k.startswith("act"))
    n_layers = models.model_config(size, 256, 128).n_layers
    at_peak = (act / tokens * EXPERIMENT_TOKENS + totals.get("fp8 weights", 0)) * n_layers / 2**30
    out = {"recipe": recipe, "act_bytes_per_token": f"{act / tokens:,.0f}",
           "fp8_weight_mib": f"{totals.get('fp8 weights', 0) / 2**20:.1f}",
           "vs_bf16": f"{act / bf16_act:.2f}x" if bf16_act else "-",
           f"gib_{size}_at_{EXPERIMENT_TOKENS}": f"{at_peak:.2f}"}
    out.update({k: f"{v / tokens:,.0f}" for k, v in sorted(totals.items()) if k.startswith("act ")})
    return out | {"_act": act / tokens}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1b")
    parser.add_argument("--tokens", type=int, default=384, help="a count no feature dimension equals")
    parser.add_argument("--recipes", nargs="+", default=["bf16", "hybrid", "current", "blockwise", "v3_fp8"])
    parser.add_argument("--compiled", action="store_true")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    rows, bf16_act = [], None
    for recipe in args.recipes:
        r = row(args.size, recipe, args.tokens, args.compiled, bf16_act)
        bf16_act = r["_act"] * args.tokens if recipe == "bf16" else bf16_act
        rows.append(r)
    columns = [c for c in dict.fromkeys(k for r in rows for k in r) if not c.startswith("_")]
    print(f"saved for backward, one {args.size} block, {'compiled (min-cut)' if args.compiled else 'eager'}:")
    print_table(rows, columns)
    write_json(args.out, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
