"""Next-token choice: greedy, or sampling with temperature, top-k and top-p (nucleus), seeded.

    temperature 0         argmax (greedy); top_k / top_p are ignored
    temperature t > 0     softmax(logits / t), restricted to
        top_k k > 0       the k most likely tokens
        top_p p < 1       the smallest set of most likely tokens whose probability reaches p
                          (the most likely token always stays)
    then one draw per row from the renormalised distribution with the caller's torch.Generator
    (same seed, same device -> same tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if not isinstance(self.temperature, (int, float)) or self.temperature < 0:
            raise ValueError(f"temperature={self.temperature!r} must be a number >= 0 (0 = greedy)")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k={self.top_k!r} must be an int >= 0 (0 = off)")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p!r} must be in (0, 1] (1 = off)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generator(self, device: torch.device | str) -> torch.Generator:
        return torch.Generator(device=device).manual_seed(self.seed)


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """FP32 logits [B, V] with the tokens outside top-k / top-p set to -inf."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked above
        drop_sorted = before >= top_p  # the first token has before = 0 and always stays
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample(logits: torch.Tensor, config: SamplingConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [B, V] -> next tokens [B] (int64)."""
    if config.greedy:
        return logits.argmax(dim=-1)
    scaled = filter_logits(logits.float() / config.temperature, config.top_k, config.top_p)
    return torch.multinomial(scaled.softmax(dim=-1), 1, generator=generator)[:, 0]
