"""Generate text from a trained run (or, with fp8train.ptq, a quantized folder).

    python launch/generate.py checkpoint=runs/<id> prompt='"def main("' max_new_tokens=200
    python launch/generate.py checkpoint=runs/<id> prompt='"import "' kv_cache=int8 temperature=0.8 top_p=0.95
    python launch/generate.py checkpoint=runs/<id> prompts='["def ", "class "]' weights=w4a16
    python launch/generate.py checkpoint=random model_size=tiny prompt=x max_new_tokens=8   # smoke test

Settings are key=value (OmegaConf; quote a value to keep its outer spaces: prompt='"def "'),
checked against `GenerateSettings`: a misspelt key is an error naming the allowed ones. A batch of
prompts is left-padded and decoded together; with one prompt the text streams to stdout.
`weights` quantizes the linear layers on the fly (round to nearest; a PTQ folder is the better
source of quantized weights) and decodes through the fused plan; `kv_cache` picks the cache mode
(bf16 | fp8 | int8 | int4 | int4_hadamard | kivi).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from omegaconf.errors import OmegaConfBaseException  # noqa: E402

WEIGHT_SPECS = {  # on-the-fly weight quantization presets: (weight spec, input spec) as QuantSpec fields
    "bf16": None,
    "w4a16": (dict(format="uint4", granularity="tile", group_size=128, symmetric=False), None),
    "w8a16": (dict(format="int8", granularity="row"), None),
    "w8a8": (dict(format="int8", granularity="row"), dict(format="int8", granularity="row")),
    "fp8": (dict(format="e4m3", granularity="row"), dict(format="e4m3", granularity="row")),
}


@dataclass
class GenerateSettings:
    checkpoint: str = "???"  # a run folder (or its checkpoints / a tag folder), a quantized folder, or "random"
    prompt: str = ""
    prompts: Optional[List[str]] = None
    max_new_tokens: int = 128
    kv_cache: str = "bf16"
    weights: str = "bf16"
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    cuda_graph: bool = True
    model_size: str = "tiny"  # checkpoint=random only


def parse(argv: list[str]) -> GenerateSettings:
    try:
        raw = OmegaConf.merge(OmegaConf.structured(GenerateSettings), OmegaConf.from_dotlist(argv))
        settings = GenerateSettings(**OmegaConf.to_container(raw, throw_on_missing=True))
    except OmegaConfBaseException as error:
        allowed = ", ".join(GenerateSettings.__dataclass_fields__)
        raise ValueError(f"{str(error).splitlines()[0]} (allowed keys: {allowed})") from None
    if settings.weights not in WEIGHT_SPECS:
        raise ValueError(f"weights={settings.weights!r}; choose one of {list(WEIGHT_SPECS)}")
    if not settings.prompt and not settings.prompts:
        raise ValueError("give prompt=\"...\" or prompts='[\"...\", \"...\"]'")
    return settings


def load(settings: GenerateSettings, device: torch.device):
    """(model, tokenizer) for the checkpoint setting: `random`, a quantized folder (fp8train.ptq,
    whose QuantizedLinear layers then run on the low-bit kernels on CUDA), or a trained run (its
    FP32 master weights, fp8train.train.trained_model)."""
    from fp8train.data import ByteTokenizer
    from fp8train.models import build_model, model_config

    if settings.checkpoint == "random":
        torch.manual_seed(settings.seed)
        return build_model(model_config(settings.model_size, vocab_size=257, max_seq_len=1024)), ByteTokenizer()
    path = Path(settings.checkpoint).expanduser()
    if (path / "config.json").is_file():  # a quantized model folder
        from fp8train.inference.lowbit_matmul import quantized_linear_kernel
        from fp8train.ptq import QuantizedLinear, load_quantized
        from fp8train.train.quantize_run import build_from_config

        QuantizedLinear.kernel = quantized_linear_kernel  # low-bit kernels on CUDA, the reference elsewhere
        return load_quantized(path, build_from_config), _folder_tokenizer(path)
    from fp8train.train.trained_model import load_trained_model

    trained = load_trained_model(path)
    return trained.model, _dataset_tokenizer(trained.dataset_dir)


def _dataset_tokenizer(directory: Path):
    from fp8train.data import ByteTokenizer, load_tokenizer
    from fp8train.data.token_file import read_meta

    try:
        return load_tokenizer(read_meta(directory), directory)
    except (FileNotFoundError, ValueError):
        return ByteTokenizer()


def _folder_tokenizer(path: Path):
    from fp8train.data import BpeTokenizer, ByteTokenizer

    return BpeTokenizer.from_file(path / "tokenizer.json") if (path / "tokenizer.json").is_file() else ByteTokenizer()


class Streamer:
    """Prints the newly decoded text of row 0 after each step (holding back a cut UTF-8 character)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.printed = tokenizer, [], 0

    def __call__(self, step: int, tokens: list[int]) -> None:
        self.ids.append(tokens[0])
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return
        sys.stdout.write(text[self.printed:])
        sys.stdout.flush()
        self.printed = len(text)


def main(argv: list[str]) -> None:
    from fp8train.inference.generation import generate
    from fp8train.inference.plan import DecodePlan
    from fp8train.inference.protocol import decoder_parts
    from fp8train.inference.sampling import SamplingConfig
    from fp8train.quant.spec import QuantSpec

    settings = parse(argv)
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(settings.device if settings.device != "auto" else auto)
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32, "bf16": torch.bfloat16,
             "fp32": torch.float32}[settings.dtype]
    model, tokenizer = load(settings, device)
    model = model.to(device, dtype).eval()
    plan = None
    if WEIGHT_SPECS[settings.weights] is not None:
        weight, inputs = WEIGHT_SPECS[settings.weights]
        plan = DecodePlan(decoder_parts(model), QuantSpec(**weight), QuantSpec(**inputs) if inputs else None)
    elif any(hasattr(m, "weight_quantized") for m in model.modules()):  # a quantized folder's layers
        plan = DecodePlan(decoder_parts(model))  # reads their codes: low-bit kernels on CUDA
    prompts = settings.prompts or [settings.prompt]
    sampling = SamplingConfig(settings.temperature, settings.top_k, settings.top_p, settings.seed)
    streamer = Streamer(tokenizer) if len(prompts) == 1 else None
    if streamer:
        sys.stdout.write(prompts[0])
    result = generate(model, [tokenizer.encode(p) for p in prompts], settings.max_new_tokens, settings.kv_cache,
                      sampling, eos_id=tokenizer.eos_id, on_step=streamer, cuda_graph=settings.cuda_graph, plan=plan)
    if streamer is None:
        for prompt, tokens in zip(prompts, result.tokens):
            print(json.dumps({"prompt": prompt, "completion": tokenizer.decode(tokens)}))
    else:
        sys.stdout.write("\n")
    print(f"[{result.steps} steps, kv_cache={settings.kv_cache}, weights={settings.weights}, device={device}, "
          f"cuda graph: {result.graph}]", file=sys.stderr)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except ValueError as error:
        print(f"generate: error: {error}", file=sys.stderr)
        sys.exit(2)
