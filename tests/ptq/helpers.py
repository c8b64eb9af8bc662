"""A tiny random decoder (fp8train.models.Transformer) and calibration batches for fast PTQ tests."""

import torch

from fp8train.models import ModelConfig, Transformer

TINY = ModelConfig(vocab_size=97, d_model=64, n_layers=2, n_heads=4, n_kv_heads=4, ffn_hidden=128, max_seq_len=32)
TINY_GQA = ModelConfig(vocab_size=97, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=128, max_seq_len=32)


def tiny_model(config: ModelConfig = TINY, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(config).eval()
    with torch.no_grad():  # non-trivial norm gains, so folding scales into them is tested for real
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
    return model


def batches(count: int = 2, batch: int = 4, seq_len: int = 16, seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 97, (batch, seq_len), generator=gen) for _ in range(count)]


def build_from_dict(config: dict) -> Transformer:
    return Transformer(ModelConfig(**{k: v for k, v in config.items() if k != "moe"})).eval()
