"""KV-cache quality table: perplexity of teacher-forced decoding through each cache mode vs BF16.

    python benchmarks/kv_quality.py --train-steps 300 --save /tmp/kvq_small.pt      # train, then measure
    python benchmarks/kv_quality.py --load /tmp/kvq_small.pt                          # measure only
    python benchmarks/kv_quality.py --load /tmp/kvq_small.pt --device cuda --dtype bf16
    python benchmarks/kv_quality.py --smollm2 --window 256 --windows 4    # SmolLM2-135M (GGUF), Python docs

Trains a model in this process (FP32, AdamW, the embedded stdlib corpus, byte tokens; `--size`,
`--seq-len`), or loads one saved by this script, then runs fp8train.inference.quality: each
validation window is prefilled for `--prefill` tokens and the rest is decoded one token at a time
reading the (quantized) cache. `--smollm2` measures the pretrained SmolLM2-135M-Instruct instead
(fp8train.models.pretrained; its tokenizer on the held-out end of Python's pydoc_data.topics).
Prints the table (markdown) and writes JSON with `--json`.
KIVI is measured with its default window R = 128 and with a harsher R = 32 (more of the context
quantized); `int4_centered:sym` is int4_centered with symmetric int4 values (a variant, not a mode).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from fp8train.data import TokenFile, ensure_default_corpus  # noqa: E402
from fp8train.inference.kv_modes import INT4_GROUP, kv_quantization  # noqa: E402
from fp8train.inference.quality import format_table, kv_cache_quality  # noqa: E402
from fp8train.models import build_model, model_config  # noqa: E402
from fp8train.quant.granularity import GranularityKind  # noqa: E402
from fp8train.quant.spec import QuantSpec  # noqa: E402


def train(size: str, seq_len: int, steps: int, batch: int, lr: float, seed: int):
    """A small model trained in FP32 on the default corpus (random windows of seq_len + 1 tokens)."""
    data = TokenFile(ensure_default_corpus(), "train")
    torch.manual_seed(seed)
    model = build_model(model_config(size, vocab_size=257, max_seq_len=2 * seq_len))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    rng = torch.Generator().manual_seed(seed)
    t0 = time.time()
    for step in range(steps):
        starts = torch.randint(0, len(data) - seq_len - 1, (batch,), generator=rng).tolist()
        chunk = torch.stack([torch.from_numpy(data.read(s, seq_len + 1).astype("int64")) for s in starts])
        for group in opt.param_groups:  # linear warm-up, cosine decay
            warm = min(1.0, (step + 1) / 30)
            group["lr"] = lr * warm * 0.5 * (1 + math.cos(math.pi * step / steps))
        loss = model(chunk[:, :-1], chunk[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 25 == 0 or step == steps - 1:
            print(f"step {step:4d} loss {loss.item():.3f} ({time.time() - t0:.0f} s)", flush=True)
    return model.eval()


def smollm2_and_text(tokens: int):
    """(SmolLM2-135M, the last `tokens` tokens of Python's pydoc topics in its tokenizer, source)."""
    import pydoc_data.topics as topics

    from fp8train.models.pretrained import load_smollm2

    model, tokenizer = load_smollm2()
    text = "\n\n".join(topics.topics[k] for k in sorted(topics.topics))
    ids = tokenizer.encode(text).ids
    if len(ids) < tokens:
        raise SystemExit(f"pydoc topics hold {len(ids)} tokens, fewer than --window x --windows + 1 = {tokens}")
    return model, torch.tensor(ids[-tokens:], dtype=torch.int64), "Python pydoc topics (held-out end)"


def parse_mode(name: str):
    """A --modes entry: a kv_cache mode, `kivi:R` (KIVI with residual R), `int4_centered:sym`
    (int4_centered with int4 symmetric g32 values instead of uint4 asymmetric ones), or any
    per-token mode with `+sinkN` (N BF16 sink tokens instead of the mode's default)."""
    if "+sink" in name:
        mode, sink = name.split("+sink")
        return dataclasses.replace(parse_mode(mode), sink=int(sink))
    if name.startswith("kivi:"):
        return kv_quantization("kivi", residual=int(name[5:]))
    if name == "int4_centered:sym":
        quant = kv_quantization("int4_centered")
        return dataclasses.replace(quant, value=QuantSpec("int4", GranularityKind.TILE, INT4_GROUP, symmetric=True))
    return kv_quantization(name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="small")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--train-steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save", type=Path)
    ap.add_argument("--load", type=Path)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--prefill", type=int, default=64)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--json", type=Path)
    ap.add_argument("--smollm2", action="store_true", help="the pretrained SmolLM2-135M instead of a trained one")
    ap.add_argument("--modes", default="bf16,fp8,int8,int4,int4_hadamard,kivi,kivi:32",
                    help="comma-separated kv_cache modes, the first is the baseline; kivi:R = KIVI with residual R")
    args = ap.parse_args()
    if args.smollm2:
        model, val, source = smollm2_and_text(args.window * args.windows + 1)
        args.size = "SmolLM2-135M-Instruct (GGUF Q4_1, dequantized)"
    elif args.load:
        saved = torch.load(args.load, map_location="cpu", weights_only=False)
        model = build_model(model_config(saved["size"], vocab_size=257, max_seq_len=saved["max_seq_len"]))
        model.load_state_dict(saved["state"])
        model.eval()
    else:
        model = train(args.size, args.seq_len, args.train_steps, args.batch, args.lr, args.seed)
        if args.save:
            torch.save({"size": args.size, "max_seq_len": 2 * args.seq_len, "state": model.state_dict(),
                        "train_steps": args.train_steps}, args.save)
    model = model.to(args.device, torch.bfloat16 if args.dtype == "bf16" else torch.float32)
    if not args.smollm2:
        val = torch.from_numpy(TokenFile(ensure_default_corpus(), "val").read(0, args.window * args.windows + 1)
                               .astype("int64"))
        source = "stdlib corpus val split"
    modes = [parse_mode(m) for m in args.modes.split(",")]
    t0 = time.time()
    rows = kv_cache_quality(model, val, modes, window=args.window, prefill=args.prefill, n_windows=args.windows,
                            on_row=lambda r: print(f"{r.mode} {r.detail} ppl {r.ppl:.4f} ({time.time() - t0:.0f} s)",
                                                   flush=True))
    header = (f"model {args.size} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, "
              f"{args.dtype}, {args.device}), data: {source}, {args.windows} windows x "
              f"{args.window} tokens, prefill {args.prefill}, {rows[0].tokens} scored tokens per mode "
              f"({time.time() - t0:.0f} s)")
    print(header)
    print(format_table(rows))
    if args.json:
        payload = {"setup": header, "rows": [r.__dict__ | {"ppl": r.ppl} for r in rows]}
        args.json.write_text(json.dumps(payload, indent=1))


if __name__ == "__main__":
    main()
